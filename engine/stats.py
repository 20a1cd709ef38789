"""Load figures of one vLLM engine, gathered through vLLM's stat-logger hook. vLLM calls ``record`` from
its output loop in this process after each engine step; ``load()`` reads the latest figures without
blocking."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Any

from protocol.engine import EngineLoad
from protocol.snapshots import TransferCounters
from protocol.transfers import TransferOutcome, TransferRecord

_RATE_WINDOW_S = 2.0
_RECORDS_KEPT = 2000


class EngineStats:
    def __init__(self) -> None:
        self._total_blocks = 0
        self._usage = 0.0
        self._running = 0
        self._waiting = 0
        self._gen_events: deque[tuple[float, int]] = deque()
        self._prompt_events: deque[tuple[float, int]] = deque()
        self._transfers = 0
        self._failed = 0
        self._bytes = 0
        self._seconds = 0.0
        self._external_tokens = 0
        self._records: OrderedDict[str, TransferRecord] = OrderedDict()

    def set_total_blocks(self, total: int) -> None:
        self._total_blocks = total

    def logger_factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A ``StatLoggerFactory`` for ``AsyncLLM``: the logger it makes writes into this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                stats.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        now = time.monotonic()
        if scheduler_stats is not None:
            self._running = int(scheduler_stats.num_running_reqs)
            self._waiting = int(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs)
            self._usage = float(scheduler_stats.kv_cache_usage)
            self._add_connector_stats(scheduler_stats.kv_connector_stats)
        if iteration_stats is not None:
            if iteration_stats.num_generation_tokens:
                self._gen_events.append((now, int(iteration_stats.num_generation_tokens)))
            prompt = iteration_stats.prompt_token_stats
            if prompt.computed:
                self._prompt_events.append((now, int(prompt.computed)))
            self._external_tokens += int(prompt.external_kv_transfer)

    def _add_connector_stats(self, data: dict[str, Any] | None) -> None:
        if not data:
            return
        for raw in data.get("pdflow_records", ()):
            self._add_record(TransferRecord.from_dict(raw))
        self._transfers += len(data.get("transfer_duration", ()))
        self._seconds += float(sum(data.get("transfer_duration", ())))
        self._bytes += int(sum(data.get("bytes_transferred", ())))
        self._failed += sum(
            len(data.get(k, ()))
            for k in ("num_failed_transfers", "num_failed_handshakes", "num_failed_notifications")
        )

    def _add_record(self, record: TransferRecord) -> None:
        # Keyed by transfer id: vLLM suffixes request ids internally, the transfer id is ours.
        self._records[record.transfer_id] = record
        self._records.move_to_end(record.transfer_id)
        while len(self._records) > _RECORDS_KEPT:
            self._records.popitem(last=False)
        if record.outcome is TransferOutcome.SUCCESS:
            self._transfers += 1
            self._bytes += record.wire_bytes
            self._seconds += record.wire_s + record.decode_s
        elif record.outcome is TransferOutcome.FAILED:
            self._failed += 1

    def record_of(self, transfer_id: str) -> TransferRecord | None:
        return self._records.get(transfer_id)

    async def wait_record(self, transfer_id: str, timeout_s: float) -> TransferRecord | None:
        """The record of ``transfer_id`` once vLLM's stats deliver it (same engine step as the request's
        output, handled just after it), or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (record := self._records.get(transfer_id)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return record

    def load(self) -> EngineLoad:
        now = time.monotonic()
        return EngineLoad(
            num_running=self._running,
            num_waiting=self._waiting,
            kv_blocks_used=round(self._usage * self._total_blocks),
            kv_blocks_total=self._total_blocks,
            decode_tps=rate(self._gen_events, now),
            prompt_tps=rate(self._prompt_events, now),
            transfer=TransferCounters(
                transfers=self._transfers,
                failed=self._failed,
                bytes=self._bytes,
                seconds=self._seconds,
                external_tokens=self._external_tokens,
            ),
        )


def rate(events: deque[tuple[float, int]], now: float) -> float:
    """Events a second over the last ``_RATE_WINDOW_S`` (older ones dropped): (time, count) pairs."""
    while events and now - events[0][0] > _RATE_WINDOW_S:
        events.popleft()
    return sum(n for _, n in events) / _RATE_WINDOW_S
