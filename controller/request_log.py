"""Request records as the controller keeps them: every state change the front doors report, the latest
state of each request, and a bounded history of finished ones (for ``ListRequests`` and ``pdctl explain``).
A record no event has touched for ``stale_s`` is a request whose front door died before it finished: past
the bound it goes too, so that the log stays bounded whatever the front doors do."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace

from protocol.lifecycle import RequestState
from protocol.snapshots import RequestEvent, RequestRecord

STALE_S = 3600.0  # longer than any request runs between two of its state changes


class RequestLog:
    def __init__(
        self, history: int, *, stale_s: float = STALE_S, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._history = history
        self._stale_s = stale_s
        self._wall_clock = wall_clock
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()  # least recently changed first

    def apply(self, event: RequestEvent, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        record = self._records.get(event.request_id)
        if record is None:
            record = RequestRecord(
                event.request_id,
                event.state,
                event.prefill_instance,
                event.decode_instance,
                prompt_tokens,
                output_tokens,
                (event,),
                event.transfer,
            )
        else:
            record = replace(
                record,
                state=event.state,
                prefill_instance=event.prefill_instance or record.prefill_instance,
                decode_instance=event.decode_instance or record.decode_instance,
                transfer=event.transfer or record.transfer,
                prompt_tokens=prompt_tokens or record.prompt_tokens,
                output_tokens=output_tokens or record.output_tokens,
                events=(*record.events, event),
            )
        self._records[event.request_id] = record
        self._records.move_to_end(event.request_id)
        self._trim()

    def _trim(self) -> None:
        """Beyond the bound, drop the least recently changed records that are finished, or stale; requests
        still running are kept. Stops at the first ``excess`` found, oldest first."""
        excess = len(self._records) - self._history
        if excess <= 0:
            return
        stale_before = self._wall_clock() - self._stale_s
        gone = []
        for rid, record in self._records.items():
            if record.state.is_terminal or record.events[-1].at < stale_before:
                gone.append(rid)
                if len(gone) == excess:
                    break
        for rid in gone:
            del self._records[rid]

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def list(self, state: str = "", limit: int = 100) -> list[RequestRecord]:
        records = list(self._records.values())
        if state == "active":
            records = [r for r in records if not r.state.is_terminal]
        elif state:
            wanted = RequestState(state)
            records = [r for r in records if r.state is wanted]
        return records[-limit:] if limit > 0 else records

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.state.value for r in self._records.values()))
