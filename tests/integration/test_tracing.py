"""Request traces (``tracing.otlp_endpoint``): what an OpenTelemetry collector receives over the real
OTLP/HTTP protocol for requests served by the real router on fake engines, one of them migrated mid-stream,
one failed."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from engine.fake_model import LatencyModel
from frontdoor.tracing import RequestTracer
from protocol.config import TracingConfig
from protocol.errors import WorkerFailed
from tests.support.fake_cluster import FakeCluster

pytestmark = pytest.mark.fakes

PROMPT = tuple(range(300, 350))
SLOW = LatencyModel(decode=((1, 0.004), (32, 0.008)))


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, by name, as OTLP's protobuf messages."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    collector.resources.append(
                        {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    )
                    for scope in resource_spans.scope_spans:
                        collector.spans.extend(scope.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, request_id: str) -> list[Any]:
        return [s for s in self.spans if _attrs(s).get("pdflow.request_id") == request_id]


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value if value.HasField("string_value") else value.int_value
    return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


async def _traced_cluster(cluster: FakeCluster, tracer: RequestTracer) -> None:
    apply = cluster.requests.apply

    def both(event: Any, prompt_tokens: int, output_tokens: int) -> None:  # what the front door actor does
        apply(event, prompt_tokens, output_tokens)
        tracer.on_event(event, prompt_tokens, output_tokens)

    cluster.requests.apply = both  # type: ignore[method-assign]


async def test_each_request_is_a_span_with_a_child_per_stage_carrying_its_id(collector: Collector) -> None:
    tracer = RequestTracer(TracingConfig(otlp_endpoint=collector.endpoint, service_name="pdflow-test"))
    async with FakeCluster(decode=2, latency=SLOW) as cluster:
        await _traced_cluster(cluster, tracer)
        await cluster.generate(PROMPT, 20, request_id="plain")
        tokens = 0
        moving: asyncio.Task[Any] | None = None
        async for chunk in cluster.stream(PROMPT, 120, request_id="moved"):
            tokens += len(chunk.token_ids)
            if moving is None and tokens >= 10:
                source = cluster.requests.get("moved").decode_instance  # type: ignore[union-attr]
                other = "decode-1" if source == "decode-0" else "decode-0"
                moving = asyncio.create_task(cluster.coordinator.migrate("moved", other, mode="live"))
        assert moving is not None and (await moving).report.outcome.value == "moved"
        cluster.client.fail("pdflow-decode-0")
        cluster.client.fail("pdflow-decode-1")
        with pytest.raises(WorkerFailed):
            await cluster.generate(PROMPT, 20, request_id="failed")
    assert tracer.flush(10)
    tracer.shutdown()

    assert collector.resources[0]["service.name"] == "pdflow-test"
    plain = {s.name: s for s in collector.of("plain")}
    assert set(plain) == {
        "pdflow.request",
        "pdflow.queue",
        "pdflow.prefill",
        "pdflow.transfer",
        "pdflow.decode",
    }
    root = plain["pdflow.request"]
    assert _attrs(root)["pdflow.outcome"] == "FINISHED_LENGTH"
    assert _attrs(root)["pdflow.output_tokens"] == 20 and _attrs(root)["pdflow.kv.outcome"] == "success"
    stages = sorted((s for s in plain.values() if s is not root), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in stages] == ["pdflow.queue", "pdflow.prefill", "pdflow.transfer", "pdflow.decode"]
    for span in stages:  # children of the request's span, within it, one after the other
        assert span.parent_span_id == root.span_id and span.trace_id == root.trace_id
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    for before, after in itertools.pairwise(stages):
        assert before.end_time_unix_nano == after.start_time_unix_nano
    assert _attrs(plain["pdflow.prefill"])["pdflow.instance"] == "prefill-0"

    moved = [s.name for s in collector.of("moved")]
    assert "pdflow.migration" in moved and moved.count("pdflow.decode") == 2  # before and after the move

    (failed,) = [s for s in collector.of("failed") if s.name == "pdflow.request"]
    assert failed.status.code == 2 and "failed" in failed.status.message  # STATUS_CODE_ERROR


def test_tracing_is_off_unless_an_endpoint_is_set() -> None:
    assert RequestTracer.from_config(TracingConfig()) is None
