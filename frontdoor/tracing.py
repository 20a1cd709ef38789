"""OpenTelemetry traces of requests, off unless ``tracing.otlp_endpoint`` is set. A front door turns each
request's lifecycle events (the ones its controller's request log gets) into one span for the request and a
child span per stage it went through: ``queue``, ``prefill``, ``transfer``, ``decode``, ``migration``. Every
span carries the request id; the request's span also where it ran, its token counts, the KV transfer's codec
and bytes, and how it ended (an error status with its message). The spans are built when the request ends
and exported in batches over OTLP/HTTP by the SDK's thread: nothing on the request path waits for the
collector."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from protocol.config import TracingConfig
from protocol.lifecycle import RequestState
from protocol.snapshots import RequestEvent

log = logging.getLogger(__name__)

STAGE_SPANS = {
    RequestState.QUEUED: "queue",
    RequestState.PREFILLING: "prefill",
    RequestState.TRANSFERRING: "transfer",
    RequestState.DECODING: "decode",
    RequestState.MIGRATING: "migration",
}


class RequestTracer:
    def __init__(self, config: TracingConfig, exporter: Any = None) -> None:
        """``exporter``: an OpenTelemetry span exporter (default: OTLP/HTTP to ``config.otlp_endpoint``)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=10)
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=TraceIdRatioBased(config.sample_ratio),
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("pdflow.frontdoor")
        self._open: dict[str, list[tuple[RequestEvent, int, int]]] = {}  # request -> its events so far

    @classmethod
    def from_config(cls, config: TracingConfig) -> RequestTracer | None:
        return cls(config) if config.otlp_endpoint else None

    def on_event(self, event: RequestEvent, prompt_tokens: int, output_tokens: int) -> None:
        """Take one of a request's lifecycle events; its last (a terminal state) makes the spans."""
        events = self._open.setdefault(event.request_id, [])
        events.append((event, prompt_tokens, output_tokens))
        if event.state.is_terminal:
            del self._open[event.request_id]
            try:
                self._spans(events)
            except Exception:  # tracing must never fail a request
                log.exception("tracing request %s failed", event.request_id)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return bool(self._provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self) -> None:
        self._provider.shutdown()

    def _spans(self, events: list[tuple[RequestEvent, int, int]]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        first, last = events[0][0], events[-1][0]
        _, prompt_tokens, output_tokens = events[-1]
        root = self._tracer.start_span("pdflow.request", start_time=_ns(first.at))
        attributes: dict[str, Any] = {
            "pdflow.request_id": last.request_id,
            "pdflow.outcome": last.state.value,
            "pdflow.prefill_instance": last.prefill_instance or "",
            "pdflow.decode_instance": last.decode_instance or "",
            "pdflow.prompt_tokens": prompt_tokens,
            "pdflow.output_tokens": output_tokens,
        }
        transfer = next((e.transfer for e, *_ in reversed(events) if e.transfer is not None), None)
        if transfer is not None:
            attributes |= {
                "pdflow.kv.codec": str(transfer.codec),
                "pdflow.kv.outcome": transfer.outcome.value,
                "pdflow.kv.wire_bytes": transfer.wire_bytes,
            }
        root.set_attributes(attributes)
        if last.state is RequestState.FINISHED_ERROR:
            root.set_status(Status(StatusCode.ERROR, last.detail or "failed"))
        context = trace.set_span_in_context(root)
        for (event, *_), (following, *_) in itertools.pairwise(events):
            name = STAGE_SPANS.get(event.state)
            if name is None:
                continue
            span = self._tracer.start_span(f"pdflow.{name}", context=context, start_time=_ns(event.at))
            span.set_attribute("pdflow.request_id", event.request_id)
            instance = (
                event.prefill_instance if event.state is RequestState.PREFILLING else event.decode_instance
            )
            if instance and event.state is not RequestState.QUEUED:
                span.set_attribute("pdflow.instance", instance)
            span.end(end_time=_ns(following.at))
        root.end(end_time=_ns(last.at))


def _ns(wall_s: float) -> int:
    return int(wall_s * 1e9)
