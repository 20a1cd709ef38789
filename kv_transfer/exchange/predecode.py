"""Early decoding: a receiver's thread that decodes each compressed layer as soon as its NIXL notification
comes and its checksum holds, while later layers are still on the wire, so that the load finds most layers
decoded. Decoded layers are held ahead of their load within a byte budget (a layer over budget, or not
decoded yet, is decoded at the load)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.exchange.outgoing import LAYER_NOTE
from kv_transfer.exchange.staging import Staging
from kv_transfer.exchange.wire import decode_slot, raw_nbytes, slot_sum
from kv_transfer.transport.arena import Region

log = logging.getLogger(__name__)
_POLL_S = 0.001  # how often the thread polls notifications while a compressed transfer is on the way
_IDLE_WAKE_S = 0.5  # how often it looks anyway while none is

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class _Entry:
    """The layers of one incoming transfer decoded before its load, by slot position (a slot holds one
    layer, or a group of them)."""

    layers: dict[int, Layers] = field(default_factory=dict)
    verified: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # (offset, nbytes, sum) checked
    nbytes: int = 0  # decoded bytes held or being decoded, counted against the budget
    seconds: float = 0.0


class EarlyDecoder:
    """Runs the decoding thread (if ``budget`` > 0). ``region(transfer_id)`` gives a transfer's region
    while it is reserved or landed here (None once it ended); ``expecting()`` says whether a transfer whose
    layers come with notifications is reserved. Methods other than ``wake``/``close`` are called with
    ``staging.lock`` held."""

    def __init__(
        self,
        staging: Staging,
        budget: int,
        *,
        region: Callable[[str], Region | None],
        expecting: Callable[[], bool],
    ) -> None:
        self._staging = staging
        self._budget = budget
        self._region = region
        self._expecting = expecting
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if budget > 0:
            self._thread = threading.Thread(target=self._loop, name="pdflow-kv-decode", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """A transfer was reserved here: poll notifications again."""
        self._wake.set()

    def pop(self, transfer_id: str, position: int, slot: dict[str, Any]) -> Layers | None:
        """The layers of slot ``position`` if they were decoded early (then handed over, their bytes
        returned to the budget)."""
        entry = self._entries.get(transfer_id)
        layers = entry.layers.pop(position, None) if entry is not None else None
        if entry is not None and layers is not None:
            size = sum(raw_nbytes(slot[name]) for name in ("k", "v"))
            entry.nbytes -= size
            self._bytes -= size
        return layers

    def verified(self, transfer_id: str) -> dict[int, tuple[int, int, int]]:
        """Slots whose checksum the thread already checked: (offset, nbytes, sum) by position."""
        entry = self._entries.get(transfer_id)
        return entry.verified if entry is not None else {}

    def count(self, transfer_id: str) -> int:
        """Layers of ``transfer_id`` decoded and waiting for its load."""
        entry = self._entries.get(transfer_id)
        return sum(len(group) for group in entry.layers.values()) if entry is not None else 0

    def forget(self, transfer_id: str) -> float:
        """Drop what was decoded of a transfer that ended; the seconds spent decoding it."""
        entry = self._entries.pop(transfer_id, None)
        if entry is None:
            return 0.0
        self._bytes -= entry.nbytes
        return entry.seconds

    @property
    def held(self) -> int:
        """Transfers with layers decoded early (leak check)."""
        return len(self._entries)

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _loop(self) -> None:
        """Decode each compressed layer as its notification comes; poll often only while a transfer whose
        layers come with one is reserved here (an idle engine's process keeps its core, as does a pull's)."""
        transport = self._staging.transport
        while not self._closed.is_set():
            with self._staging.lock:
                expecting = self._expecting()
            if not expecting:
                self._wake.wait(_IDLE_WAKE_S)
                self._wake.clear()
            notes = transport.notifications()
            for note in notes:
                try:
                    self._decode(note)
                except Exception as exc:  # the load decodes (and reports) whatever failed here
                    log.debug("early decode of a layer failed: %s", exc)
            if expecting and not notes:
                time.sleep(_POLL_S)

    def _decode(self, note: bytes) -> None:
        """Decode the slot ``note`` announces if its transfer is still here, the budget allows and its
        bytes pass their checksum (a notification may beat its bytes; the commit's check stands then)."""
        if not note.startswith(LAYER_NOTE):
            return
        body = json.loads(note[len(LAYER_NOTE) :])
        transfer_id, position, slot = str(body["t"]), int(body["p"]), body["s"]
        if "sum" not in slot:
            return
        size = sum(raw_nbytes(slot[name]) for name in ("k", "v"))
        lock, buffer = self._staging.lock, self._staging.transport.buffer
        with lock:
            region = self._region(transfer_id)
            if region is None or self._bytes + size > self._budget:
                return
            entry = self._entries.setdefault(transfer_id, _Entry())
            entry.nbytes += size
            self._bytes += size
        started = time.perf_counter()
        offset, nbytes, digest = int(slot["offset"]), int(slot["nbytes"]), int(slot["sum"])
        layers = None
        try:
            if (
                offset + nbytes <= region.nbytes
                and slot_sum(buffer, region.offset + offset, nbytes) == digest
            ):
                layers = decode_slot(buffer, transfer_id, region, slot)
        finally:
            with lock:
                if self._entries.get(transfer_id) is entry:  # else it ended meanwhile, budget returned
                    entry.seconds += time.perf_counter() - started
                    if layers is None:
                        entry.nbytes -= size
                        self._bytes -= size
                    else:
                        entry.layers[position] = layers
                        entry.verified[position] = (offset, nbytes, digest)
