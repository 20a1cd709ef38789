"""The receiving side of a pull: a transfer whose bytes this side reads out of the sender's registered memory
(NIXL READ) into its own reservation, rather than the sender writing them.

A live migration's pre-copy stages travel this way. On one host the side that posts a one-sided move pays for
it in CPU (94 MB: 26-29 ms of the initiator's CPU, under 1 ms of the other side's, READ or WRITE alike), and
the source of a migration is the instance the policy found overloaded, the destination the one it chose for
its headroom. The sender reserves as for a push, asks for the pull (op ``pull``), polls it (``pull_status``),
checks that the blocks it named were not given away meanwhile, and commits as for a push; its abort stops the
pull before the reservation is freed, so a read never lands in a region that someone else holds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kv_transfer.exchange.pacing import Pacer
from kv_transfer.transport.arena import Region
from kv_transfer.transport.base import Transport, XferState
from protocol.kv_ops import Done, Pull, PullState, PullStatus

_POLL_MIN_S, _POLL_MAX_S = 0.0001, 0.002  # how often a read is checked: first, and at most
_STOP_GRACE_S = 0.5  # how long a stopped pull's read on the wire may still take (a layer takes milliseconds)


class PullCancelled(Exception):
    pass


@dataclass(slots=True)
class _Pull:
    future: Future[None]
    cancel: threading.Event


class Puller:
    """Runs pulls one after another on a thread of its own. ``hold(transfer_id)`` returns the transfer's
    reservation here with a fresh lease, or None once it is gone; the reads of a slot start only after it."""

    def __init__(
        self, transport: Transport, hold: Callable[[str], Region | None], *, timeout_s: float = 30.0
    ) -> None:
        self._transport = transport
        self._hold = hold
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-pull")
        self._pulls: dict[str, _Pull] = {}
        self._lock = threading.Lock()

    def start(self, op: Pull) -> Done:
        """Op ``Pull``: read its slots from its peer into its transfer's reservation, one slot after another
        at its rate at most (none: all at once). Returns at once; ValueError (refused) for spans outside the
        reservation or a transfer with no reservation here."""
        transfer_id, peer = op.transfer_id, op.peer
        region = self._hold(transfer_id)
        if region is None:
            raise ValueError(f"transfer {transfer_id} has no reservation here (expired or aborted)")
        try:
            slots = [[(int(a), int(o), int(n)) for a, o, n in spans] for spans in op.slots]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"transfer {transfer_id}: malformed pull slots ({exc})") from None
        for spans in slots:
            for _, offset, nbytes in spans:
                if nbytes <= 0 or offset < region.offset or offset + nbytes > region.offset + region.nbytes:
                    raise ValueError(f"transfer {transfer_id}: {nbytes} B at {offset} leave its reservation")
        rate = op.rate or None
        with self._lock:
            if transfer_id in self._pulls:
                raise ValueError(f"transfer {transfer_id} is already being pulled")
            cancel = threading.Event()
            future = self._pool.submit(self._run, transfer_id, peer, slots, rate, cancel)
            self._pulls[transfer_id] = _Pull(future, cancel)
        return Done()

    def status(self, op: PullStatus) -> PullState:
        """Op ``PullStatus``: done once every slot landed (then forgotten), not done while it runs; the
        pull's error (refused) if it failed."""
        transfer_id = op.transfer_id
        with self._lock:
            pull = self._pulls.get(transfer_id)
            if pull is None:
                raise ValueError(f"no pull of {transfer_id} here")
            if not pull.future.done():
                return PullState(done=False)
            del self._pulls[transfer_id]
        pull.future.result()  # raises the pull's error
        return PullState(done=True)

    def stop(self, transfer_id: str) -> None:
        """Stop a pull (before its reservation is freed) and wait for the read on the wire, if any, a
        little: one from a peer that died never ends (its bytes never come either)."""
        with self._lock:
            pull = self._pulls.pop(transfer_id, None)
        if pull is None:
            return
        pull.cancel.set()
        with contextlib.suppress(Exception):  # stopped or failed: either way it reads no more
            pull.future.result(timeout=2 * _STOP_GRACE_S)

    def running(self) -> int:
        """Pulls not ended or not asked about yet (leak check)."""
        with self._lock:
            return len(self._pulls)

    def close(self) -> None:
        with self._lock:
            pulls, self._pulls = list(self._pulls.values()), {}
        for pull in pulls:
            pull.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(
        self,
        transfer_id: str,
        peer: str,
        slots: list[list[tuple[int, int, int]]],
        rate: float | None,
        cancel: threading.Event,
    ) -> None:
        pace = Pacer(rate, sleep=cancel.wait) if rate else None
        batches = slots if pace is not None else [[span for spans in slots for span in spans]]
        deadline = time.monotonic() + self._timeout_s
        for spans in batches:
            if pace is not None:
                pace.wait(sum(n for _, _, n in spans))
            if cancel.is_set():
                raise PullCancelled(f"the pull of {transfer_id} was stopped")
            if self._hold(transfer_id) is None:
                raise ValueError(f"transfer {transfer_id}: its reservation ended during the pull")
            xfer = self._transport.read_into(peer, spans)
            try:
                since = time.perf_counter()
                while (state := xfer.state()) is XferState.PENDING:
                    if cancel.is_set():
                        deadline = min(deadline, time.monotonic() + _STOP_GRACE_S)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"a read of {transfer_id} from {peer} did not end in time")
                    time.sleep(min(_POLL_MAX_S, max(_POLL_MIN_S, (time.perf_counter() - since) / 8)))
            finally:
                xfer.release()
            if state is XferState.FAILED:
                raise RuntimeError(f"a read of {transfer_id} from {peer} failed")
