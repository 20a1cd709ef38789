"""Request records as the controller keeps them: every state change the front doors report, the latest
state of each request, and a bounded history of finished ones (for ``ListRequests`` and ``pdctl explain``)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import replace

from protocol.lifecycle import RequestState
from protocol.snapshots import RequestEvent, RequestRecord


class RequestLog:
    def __init__(self, history: int) -> None:
        self._history = history
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()

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
        """Drop the oldest finished records beyond the bound; requests still running are always kept."""
        excess = len(self._records) - self._history
        if excess <= 0:
            return
        for rid in [rid for rid, r in self._records.items() if r.state.is_terminal][:excess]:
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
