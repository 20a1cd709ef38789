"""The parts of ``benchmarks/chaos.py``: its clients (greedy gRPC streams that keep every token id and how
they ended), its faults (kill an actor, SIGKILL an engine core, SIGSTOP a process tree for a while) and the
probes that find where a request is (which worker holds it, how far its migration went)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLIENT_DEADLINE_S = 150.0  # a request the cluster has not ended by then is hung


@dataclass
class Call:
    """One client request and what it got."""

    rid: str
    prompt: int  # index into the prompt pool
    max_tokens: int
    sent: float
    kind: str  # "target" (the request a fault is aimed at), "bystander" (sent beside it) or "load"
    tokens: list[int] = field(default_factory=list)
    finish: str = ""
    error: str = ""  # "" when it ended well; else the gRPC status and its details
    first_at: float | None = None  # its first token
    ended: float | None = None
    faults: list[str] = field(default_factory=list)  # the faults it was in flight for, by label
    marks: list[int] = field(default_factory=list)  # how many tokens it had when each of them struck
    during: str = ""  # sent after a fault struck, before the cluster had recovered from it: its label
    verdict: str = ""  # set by the token check

    @property
    def ok(self) -> bool:
        return not self.error and self.finish == "length" and len(self.tokens) == self.max_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent

    @property
    def hung(self) -> bool:
        """Ended by the client's own deadline: the cluster never ended it (the front door's deadlines are
        typed errors, well within it)."""
        waited = (self.ended or time.monotonic()) - self.sent
        return self.error.startswith("DEADLINE_EXCEEDED") and waited >= CLIENT_DEADLINE_S - 1

    @property
    def typed(self) -> bool:
        """A failure the client can act on: a gRPC status other than UNKNOWN with a message, or a stream that
        ended with the finish reason ``error``; never a stream that stops without a finish reason."""
        if self.ok:
            return True
        if self.error:
            return not self.error.startswith(("UNKNOWN", "STREAM ENDED"))
        return self.finish in ("error", "abort")


def run_call(grpc_address: str, call: Call, prompt_ids: list[int]) -> Call:
    """Stream ``call`` over the gRPC Router API, greedy, every token forced (``ignore_eos``)."""
    import grpc

    from protocol.proto import router_pb2, router_pb2_grpc

    request = router_pb2.GenerateRequest(
        request_id=call.rid,
        prompt_token_ids=router_pb2.TokenIds(ids=prompt_ids),
        sampling=router_pb2.SamplingParams(max_tokens=call.max_tokens, temperature=0.0, ignore_eos=True),
    )
    metadata = [("authorization", f"Bearer {key}")] if (key := os.environ.get("PDFLOW_API_KEY")) else []
    try:
        with grpc.insecure_channel(grpc_address) as channel:
            stream = router_pb2_grpc.RouterStub(channel).Generate(
                request, timeout=CLIENT_DEADLINE_S, metadata=metadata
            )
            for response in stream:
                if response.token_ids and call.first_at is None:
                    call.first_at = time.monotonic()
                call.tokens.extend(response.token_ids)
                call.finish = response.finish_reason or call.finish
        if not call.finish:
            call.error = "STREAM ENDED without a finish reason"
    except grpc.RpcError as exc:
        call.error = f"{exc.code().name}: {exc.details()}"
    call.ended = time.monotonic()
    return call


# ---- where a request is ----


def holder(workers: dict[str, Any], rid: str) -> str | None:
    """The name of the worker whose engine holds ``rid`` now, if any."""
    import ray

    for name, actor in workers.items():
        try:
            if rid in ray.get(actor.requests.remote(), timeout=10):
                return name
        except ray.exceptions.RayError:  # killed since the controller last listed it
            continue
    return None


def migration_phase(worker: Any, rid: str) -> str | None:
    import ray

    phases: dict[str, str] = ray.get(worker.migration_phases.remote(), timeout=10)
    return phases.get(rid)


def wait_for(predicate: Callable[[], Any], deadline_s: float, poll_s: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something true (returned) or the deadline passes (None)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a worker being killed or restarted answers nothing
            if found := predicate():
                return found
        time.sleep(poll_s)
    return None


# ---- faults ----


def process_tree(actor: Any) -> tuple[int, list[int]]:
    """The actor's process id and those of its descendants (an engine core and its workers)."""
    import psutil
    import ray

    pid: int = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
    return pid, [p.pid for p in psutil.Process(pid).children(recursive=True)]


def engine_core(actor: Any) -> int:
    """The process id of the worker's vLLM engine core (its child process named for it, else its first)."""
    import psutil

    _, children = process_tree(actor)
    if not children:
        raise RuntimeError("the worker has no engine process")
    for pid in children:
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in psutil.Process(pid).name() or "EngineCore" in " ".join(
                psutil.Process(pid).cmdline()
            ):
                return pid
    return children[0]


def inject(fault: str, actor: Any, stop_s: float) -> threading.Thread | None:
    """Apply ``fault`` to ``actor``: ``kill`` (Ray kills the actor), ``core`` (SIGKILL its engine core) or
    ``stop`` (SIGSTOP its whole process tree, SIGCONT after ``stop_s``: the returned thread does that)."""
    import ray

    if fault == "kill":
        ray.kill(actor, no_restart=True)
        return None
    if fault == "core":
        os.kill(engine_core(actor), signal.SIGKILL)
        return None
    if fault != "stop":
        raise ValueError(f"unknown fault {fault!r}")
    pid, children = process_tree(actor)
    tree = [pid, *children]
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)

    def resume() -> None:
        time.sleep(stop_s)
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)

    thread = threading.Thread(target=resume, daemon=True)
    thread.start()
    return thread


# ---- the token check ----


def check_tokens(
    call: Call, reference: list[int], continue_from: Callable[[list[int], int], list[int]]
) -> str:
    """``exact``: the colocated reference's greedy tokens. ``resumed``: those up to a cut, then exactly the
    reference's continuation of prompt plus the tokens up to the cut (a stream resumed on another worker by
    recompute: batch and precision differences between prefill and decode may change a later token, never
    lose or repeat one). ``wrong`` otherwise. ``continue_from(tokens, n)``: the reference's next ``n``."""
    got, want = call.tokens, reference[: call.max_tokens]
    if got == want:
        return "exact"
    if len(got) != len(want):
        return "wrong"
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    # where the stream was cut: about where the client stood when a fault struck (a few tokens may have
    # been on their way), or just before the first token that differs
    cuts = {c for mark in call.marks for c in range(mark, mark + 6)} | set(range(first - 7, first + 1))
    for cut in sorted(c for c in cuts if 0 <= c <= first):
        if continue_from(got[:cut], call.max_tokens - cut) == got[cut:]:
            return "resumed"
    return "wrong"
