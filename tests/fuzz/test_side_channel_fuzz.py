"""2,000 malformed messages to a worker's KV side channel, signed with the cluster secret (what a buggy or
compromised peer inside the cluster could send) or not (a stranger): frames of every count, random bytes,
JSON that is not an object, every operation with fields missing, mistyped, negative, huge or NaN, and
unknown operations. The server thread lives through all of it, answers every well-formed envelope with a
refusal, reserves and reads nothing, and serves a real transfer afterwards."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kv_transfer.exchange.endpoint import KVEndpoint
from protocol.kv_ops import OPS
from tests.fuzz.cases import json_value
from tests.support.kv import NOTHING_HELD, endpoint_pair, make_layers, send

pytestmark = pytest.mark.integration
CASES = 2_000
SECRET = b"fuzzing-cluster-secret"
HOSTILE = [None, -1, -(2**63), 2**80, 1e308, float("nan"), "", "x" * 5000, [], {}, True, "../../etc"]


@pytest.fixture
def endpoints() -> Iterator[tuple[KVEndpoint, KVEndpoint]]:
    with endpoint_pair(SECRET) as pair:
        yield pair


def _sign(body: bytes) -> list[bytes]:
    return [body, hmac.new(SECRET, body, hashlib.sha256).digest()]


def _malformed_op(rng: random.Random) -> dict[str, Any]:
    """An operation with one field missing, or every field hostile (never a well-formed request)."""
    cls = rng.choice(list(OPS.values()))
    fields = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    op: dict[str, Any] = {"op": cls.OP}
    if required and rng.random() < 0.3:
        missing = rng.choice(required)
        op |= {f: "t-1" for f in fields if f != missing}
    else:
        op |= {f: rng.choice(HOSTILE) for f in fields}
        op[rng.choice(fields) if fields else "extra"] = rng.choice([-5, None, float("nan"), 2**80, [1]])
    return op


def _case(rng: random.Random) -> tuple[str, list[bytes]]:
    roll = rng.random()
    envelope = [b""]  # what a REQ socket puts before the body
    if roll < 0.15:
        return "frame count", [rng.randbytes(rng.randint(0, 30)) for _ in range(rng.choice([1, 2, 4, 5, 9]))]
    if roll < 0.3:
        return "random bytes", [*envelope, rng.randbytes(rng.randint(0, 200))]
    if roll < 0.45:
        return "signed random bytes", envelope + _sign(rng.randbytes(rng.randint(0, 200)))
    if roll < 0.55:
        body = json.dumps(json_value(rng), allow_nan=True).encode()
        return "signed JSON, not an op", envelope + _sign(body)
    if roll < 0.85:
        body = json.dumps(_malformed_op(rng), allow_nan=True).encode()
        return "signed malformed op", envelope + _sign(body)
    if roll < 0.9:
        body = json.dumps({"op": rng.choice(["teleport", "", "RESERVE", "__init__", None]), "x": 1}).encode()
        return "signed unknown op", envelope + _sign(body)
    body = json.dumps(_malformed_op(rng)).encode()
    forged = rng.choice([b"", b"\x00" * 32, hashlib.sha256(body).digest(), rng.randbytes(32)])
    return "unsigned or forged", envelope + rng.choice([[body], [body, forged]])


def test_two_thousand_malformed_messages_are_refused_and_the_channel_serves_on(endpoints) -> None:
    sender, receiver = endpoints
    rng = random.Random(13)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{receiver.address}")
    kinds: collections.Counter[str] = collections.Counter()
    sent_envelopes = answered = 0
    wrong: list[str] = []
    try:
        for number in range(CASES):
            kind, frames = _case(rng)
            kinds[kind] += 1
            sock.send_multipart(frames)
            well_formed = len(frames) in (2, 3) and frames[0] == b""
            sent_envelopes += well_formed
            while sock.poll(0 if not well_formed else 5_000):  # the answer to this one, if any
                reply_frames = sock.recv_multipart()
                reply = json.loads(reply_frames[1])
                answered += 1
                if reply.get("ok") is not False:
                    wrong.append(f"case {number} ({kind}) {frames!r:.200} was served: {reply}")
                if well_formed:
                    break
    finally:
        sock.close()
    assert not wrong, "\n".join(wrong[:10])
    assert answered == sent_envelopes  # every well-formed envelope answered (and the others dropped)
    assert receiver.held == NOTHING_HELD  # nothing reserved, pulled or landed for any of them
    tid = send(sender, receiver, "int8", make_layers())  # the channel still serves its own cluster
    assert receiver.take(tid) is not None
    receiver.release(tid, decode_s=0.0)
    assert len(kinds) == 7 and min(kinds.values()) > 50, kinds
    print(f"\n{CASES} side-channel cases: {dict(kinds)}; {answered} refused, the rest dropped")
