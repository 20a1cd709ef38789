"""The KV side channel's typed operations: each survives its trip through JSON, and a malformed one is a
clear refusal (``ValueError``) naming the field, never a ``KeyError`` deep in a handler."""

from __future__ import annotations

import json

import pytest

from protocol.kv_ops import (
    Abort,
    Commit,
    Committed,
    Pull,
    PullState,
    PullStatus,
    Push,
    PushStarted,
    PushState,
    PushStatus,
    Reserve,
    Reserved,
    op_to_wire,
    parse_op,
    parse_reply,
    reply_to_wire,
)

OPS = [
    Reserve("t/0", "r", 4096, {"name": "p", "metadata": "", "base_addr": 0, "capacity": 1}, notes=False),
    Commit("t/0", {"tokens": 12, "slots": [{"offset": 0, "nbytes": 8}], "record": {}}),
    Abort("t/0", "the client left"),
    Pull("t/0", "p", [[[140000, 64, 8192], [150000, 8256, 64]]], rate=1e8),
    PullStatus("t/0"),
    Push("r", "r/m1/0", "127.0.0.1:5555", 0, 8, [3, 4, 5], background=True),
    PushStatus("r/m1/0"),
]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.OP)
def test_every_operation_survives_json_as_it_was_sent(op: object) -> None:
    assert parse_op(json.loads(json.dumps(op_to_wire(op)))) == op  # type: ignore[arg-type]


def test_replies_come_back_typed() -> None:
    for op, reply in [
        (OPS[0], Reserved(64, {"name": "d"})),
        (OPS[1], Committed([2])),
        (OPS[4], PullState(done=True)),
        (OPS[5], PushStarted([3, 4, 5], eta_s=0.5)),
        (OPS[6], PushState({"outcome": "success"})),
    ]:
        wire = json.loads(json.dumps({"ok": True, **reply_to_wire(reply)}))
        assert parse_reply(op, wire) == reply


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "teleport"}, "unknown side-channel op 'teleport'"),
        ({"op": "reserve", "transfer_id": "t", "request_id": "r", "peer": {}}, "field 'nbytes' is missing"),
        (
            {"op": "reserve", "transfer_id": "t", "request_id": "r", "nbytes": "12", "peer": {}},
            "'nbytes' must",
        ),
        (
            {"op": "reserve", "transfer_id": "t", "request_id": "r", "nbytes": True, "peer": {}},
            "'nbytes' must",
        ),
        (
            {
                "op": "push",
                "request_id": "r",
                "transfer_id": "t",
                "destination": "d",
                "first_block": 0,
                "end_block": 2.5,
                "expected": [],
            },
            "'end_block' must",
        ),
        ({"op": "abort", "transfer_id": ["t"]}, "'transfer_id' must"),
        ({"op": "pull", "transfer_id": "t", "peer": "p", "slots": "all"}, "'slots' must"),
    ],
)
def test_a_malformed_operation_is_refused_naming_what_is_wrong(message: dict, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=error):
        parse_op(message)
