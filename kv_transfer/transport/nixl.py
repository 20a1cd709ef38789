"""The NIXL transport: one agent per worker on the UCX backend, one registered host (or device) buffer, and
one-sided WRITE/READ between buffers. The agent's progress thread moves the bytes; posting never blocks.

The progress thread waits for UCX events at most ``PROGRESS_DELAY_US`` between rounds. NIXL's Python API
fixes that delay at 0, which makes the thread spin: about a core per agent even while idle, three agents on
a 2-core laptop cluster, and slower transfers besides (measured in ``benchmarks/nixl_progress.py``).

``nixl`` is imported when a transport is made, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from kv_transfer.transport.base import PeerInfo, TransportError, XferState

log = logging.getLogger(__name__)

_STATES = {"DONE": XferState.DONE, "PROC": XferState.PENDING, "ERR": XferState.FAILED}

PROGRESS_DELAY_US = 1000
_AGENT_LOCK = threading.Lock()


def make_agent(name: str, progress_delay_us: int | None = PROGRESS_DELAY_US) -> Any:
    """A NIXL agent on UCX with a progress thread that waits up to ``progress_delay_us`` between rounds
    (``None``: NIXL's own busy-polling thread)."""
    import nixl._api as api

    config = api.nixl_agent_config(
        enable_prog_thread=True, backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
    )
    if progress_delay_us is None:
        return api.nixl_agent(name, config)
    native = api.nixlBind.nixlAgentConfig

    class _Config(native):  # type: ignore[misc,valid-type]
        """NIXL's native config, except that the API's ``pthrDelay = 0`` becomes ``progress_delay_us``."""

        @property
        def pthrDelay(self) -> int:
            return int(native.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, _: int) -> None:
            native.pthrDelay.__set__(self, progress_delay_us)

    with _AGENT_LOCK:  # the API builds its config from the module's name: swap it for this one call
        api.nixlBind.nixlAgentConfig = _Config
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind.nixlAgentConfig = native


class _NixlXfer:
    def __init__(self, agent: Any, handle: Any, state: XferState) -> None:
        self._agent = agent
        self._handle = handle
        self._state = state
        self._released = False

    def state(self) -> XferState:
        if self._state is XferState.PENDING:
            self._state = _STATES.get(self._agent.check_xfer_state(self._handle), XferState.FAILED)
        return self._state

    def release(self) -> None:
        if not self._released:
            self._released = True
            try:
                self._agent.release_xfer_handle(self._handle)
            except Exception as exc:  # a handle of a dead peer may refuse release; nothing else to free
                log.debug("release of a NIXL transfer handle failed: %s", exc)


def _thread_ids() -> set[int]:
    """This process's threads (Linux; elsewhere none)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _lower_priority(threads: set[int], nice: int) -> None:
    """Raise the nice value of ``threads`` by ``nice`` (Linux: per thread)."""
    for tid in threads if nice > 0 else ():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError as exc:  # the thread ended, or no permission: it keeps its priority
            log.debug("cannot lower the priority of NIXL thread %d: %s", tid, exc)


class NixlTransport:
    """``capacity`` bytes of staging memory registered with a NIXL agent called ``name``. The agent's own
    threads (progress, UCX) run ``nice`` steps below the thread that makes the transport: on a CPU engine
    they move bytes on the cores that compute tokens, and while moving a migration's KV they took up to half
    the source's core (``benchmarks/migration.py --pin``)."""

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        device: str = "cpu",
        progress_delay_us: int | None = PROGRESS_DELAY_US,
        nice: int = 0,
    ) -> None:
        self._name = name
        self._buffer = torch.zeros(capacity, dtype=torch.uint8, device=device)
        self._mem = "DRAM" if self._buffer.device.type == "cpu" else "VRAM"
        self._dev = self._buffer.device.index or 0
        before = _thread_ids()
        self._agent = make_agent(name, progress_delay_us)
        _lower_priority(_thread_ids() - before, nice)
        self._reg = self._agent.register_memory(self._buffer)
        self._sources: dict[tuple[int, int], Any] = {}  # (address, nbytes) -> registration
        self._peers: dict[str, PeerInfo] = {}
        self._lock = threading.Lock()

    @property
    def buffer(self) -> torch.Tensor:
        return self._buffer

    def peer_info(self) -> PeerInfo:
        return PeerInfo(
            self._name, self._agent.get_agent_metadata(), self._buffer.data_ptr(), self._buffer.numel()
        )

    def add_peer(self, peer: PeerInfo) -> None:
        with self._lock:
            known = self._peers.get(peer.name)
            if known == peer:
                return
            if known is not None:  # restarted under the same name: its old agent's metadata is stale
                log.info("NIXL peer %s has new metadata (restarted): replacing the old", peer.name)
                self._peers.pop(peer.name)
                try:
                    self._agent.remove_remote_agent(peer.name)
                except Exception as exc:
                    log.debug("removing NIXL peer %s: %s", peer.name, exc)
            added = self._agent.add_remote_agent(peer.metadata)
            name = added.decode() if isinstance(added, bytes) else str(added)
            if name != peer.name:
                raise TransportError(f"peer metadata names agent {name!r}, expected {peer.name!r}")
            self._peers[peer.name] = peer

    def remove_peer(self, name: str) -> None:
        with self._lock:
            if self._peers.pop(name, None) is not None:
                try:
                    self._agent.remove_remote_agent(name)
                except Exception as exc:
                    log.debug("removing NIXL peer %s: %s", name, exc)

    def write(
        self, peer: str, local_offset: int, remote_offset: int, nbytes: int, notif: bytes = b""
    ) -> _NixlXfer:
        return self._post("WRITE", peer, local_offset, remote_offset, nbytes, notif)

    def register(self, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise TransportError("only contiguous memory can be registered")
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        with self._lock:
            if key in self._sources:
                return
            try:
                self._sources[key] = self._agent.register_memory(tensor)
            except Exception as exc:
                raise TransportError(
                    f"registering {key[1]} B at {key[0]:#x} with NIXL failed: {exc}"
                ) from exc

    def write_from(self, peer: str, spans: list[tuple[int, int, int]], notif: bytes = b"") -> _NixlXfer:
        info = self._peers.get(peer)
        if info is None:
            raise TransportError(f"{self._name}: unknown peer {peer!r} (no handshake)")
        if not spans:
            raise TransportError("a write needs at least one span")
        if min(o for _, o, _ in spans) < 0 or max(o + n for _, o, n in spans) > info.capacity:
            raise TransportError(f"write of {len(spans)} spans leaves {peer}'s buffer")
        # Every descriptor is a UCX operation of its own, with its own cost (a 30-layer write of 60 spans took
        # 1.7x as long as one span of the same bytes on loopback): a run of spans contiguous on both sides
        # within one registration goes as one. The spans of one layer share its registration, so it is
        # looked up only when a span leaves it (a search per span scanned all 31 for each of a 4096-token
        # push's 15,000 spans).
        joined: list[tuple[int, int, int]] = []
        at, size = -1, 0
        for address, offset, nbytes in spans:
            same = at <= address <= address + nbytes <= at + size
            if not same:
                at, size = next(
                    ((a, n) for a, n in self._sources if a <= address and address + nbytes <= a + n), (-1, 0)
                )
                if at < 0:
                    raise TransportError(f"write of {nbytes} B from {address:#x}: not in a registered tensor")
            last_address, last_offset, last_nbytes = joined[-1] if joined else (-1, -1, 0)
            if same and last_address + last_nbytes == address and last_offset + last_nbytes == offset:
                joined[-1] = (last_address, last_offset, last_nbytes + nbytes)
            else:
                joined.append((address, offset, nbytes))
        spans = joined
        local = self._agent.get_xfer_descs([(a, n, self._dev) for a, _, n in spans], self._mem)
        remote = self._agent.get_xfer_descs(
            [(info.base_addr + offset, n, self._dev) for _, offset, n in spans], self._mem
        )
        return self._start("WRITE", local, remote, peer, notif)

    def read(self, peer: str, local_offset: int, remote_offset: int, nbytes: int) -> _NixlXfer:
        return self._post("READ", peer, local_offset, remote_offset, nbytes)

    def read_into(self, peer: str, spans: list[tuple[int, int, int]]) -> _NixlXfer:
        if peer not in self._peers:
            raise TransportError(f"{self._name}: unknown peer {peer!r} (no handshake)")
        if not spans:
            raise TransportError("a read needs at least one span")
        if min(o for _, o, _ in spans) < 0 or max(o + n for _, o, n in spans) > self._buffer.numel():
            raise TransportError(f"read of {len(spans)} spans leaves this buffer")
        joined: list[tuple[int, int, int]] = []  # runs contiguous on both sides go as one (see write_from)
        for address, offset, nbytes in spans:
            if (
                joined
                and joined[-1][0] + joined[-1][2] == address
                and joined[-1][1] + joined[-1][2] == offset
            ):
                joined[-1] = (joined[-1][0], joined[-1][1], joined[-1][2] + nbytes)
            else:
                joined.append((address, offset, nbytes))
        base = self._buffer.data_ptr()
        local = self._agent.get_xfer_descs([(base + o, n, self._dev) for _, o, n in joined], self._mem)
        remote = self._agent.get_xfer_descs([(a, n, self._dev) for a, _, n in joined], self._mem)
        return self._start("READ", local, remote, peer, b"")

    def notifications(self) -> list[bytes]:
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as exc:  # a peer that died mid-notification; nothing to deliver
            log.debug("polling NIXL notifications: %s", exc)
            return []
        return [msg for msgs in notifs.values() for msg in msgs]

    def close(self) -> None:
        """Deregister the memory and free the NIXL agent now; the transport is unusable after. An agent left
        to the garbage collector can be freed just as vLLM's shutdown signal arrives: the ``SystemExit`` of
        the signal handler is then raised inside the agent's ``__del__``, which swallows it, and a worker
        whose engine failed to start never exits (its engine then hung at start until the deadline)."""
        if self._agent is None:
            return
        for name in list(self._peers):
            self.remove_peer(name)
        for reg in [self._reg, *self._sources.values()]:
            try:
                self._agent.deregister_memory(reg)
            except Exception as exc:
                log.debug("deregistering memory from NIXL: %s", exc)
        self._sources.clear()
        self._agent = None

    def _post(
        self, op: str, peer: str, local_offset: int, remote_offset: int, nbytes: int, notif: bytes = b""
    ) -> _NixlXfer:
        info = self._peers.get(peer)
        if info is None:
            raise TransportError(f"{self._name}: unknown peer {peer!r} (no handshake)")
        if local_offset < 0 or local_offset + nbytes > self._buffer.numel():
            raise TransportError(f"{op} of {nbytes} B at local offset {local_offset} leaves the buffer")
        if remote_offset < 0 or remote_offset + nbytes > info.capacity:
            raise TransportError(
                f"{op} of {nbytes} B at remote offset {remote_offset} leaves {peer}'s buffer"
            )
        local = self._agent.get_xfer_descs(
            [(self._buffer.data_ptr() + local_offset, nbytes, self._dev)], self._mem
        )
        remote = self._agent.get_xfer_descs([(info.base_addr + remote_offset, nbytes, self._dev)], self._mem)
        return self._start(op, local, remote, peer, notif)

    def _start(self, op: str, local: Any, remote: Any, peer: str, notif: bytes) -> _NixlXfer:
        try:
            handle = self._agent.initialize_xfer(op, local, remote, peer, notif)
            state = _STATES.get(self._agent.transfer(handle), XferState.FAILED)
        except Exception as exc:  # nixl raises its own exception types on a dead peer
            raise TransportError(f"{op} to {peer} failed to post: {exc}") from exc
        return _NixlXfer(self._agent, handle, state)
