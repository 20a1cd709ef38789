"""The pure parts of ``pdctl bench``: percentiles, summary and SLO attainment, output, synthetic prompts."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from pdctl.bench import (
    BenchResult,
    RequestRecord,
    latency_stats,
    percentile,
    summarize,
    synthesize_prompt,
)


def _record(
    index: int,
    *,
    ttft: float | None,
    tpot: float | None,
    e2e: float | None,
    tokens: int = 10,
    ok: bool = True,
    finished: float = 1.0,
    status: int | None = 200,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        prompt_tokens=100,
        max_tokens=tokens,
        scheduled_s=0.0,
        sent_s=0.0,
        finished_s=finished,
        ok=ok,
        completion_tokens=tokens if ok else 0,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        http_status=status,
        error=error,
    )


RECORDS = [
    _record(0, ttft=0.1, tpot=0.02, e2e=0.28, finished=1.0),  # meets both
    _record(1, ttft=0.3, tpot=0.02, e2e=0.48, finished=2.0),  # TTFT over 0.2
    _record(2, ttft=0.2, tpot=0.06, e2e=0.74, finished=3.0),  # TPOT over 0.05 (TTFT exactly at the SLO)
    _record(3, ttft=0.05, tpot=None, e2e=0.05, tokens=1, finished=3.5),  # one token: no TPOT, meets
    _record(
        4, ttft=None, tpot=None, e2e=None, ok=False, finished=4.0, status=400, error="max_tokens too big"
    ),
]


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentile(list(range(101)), 90) == 90
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_stats() -> None:
    stats = latency_stats([0.1, 0.2, 0.3, 0.4, 1.0])
    assert stats.mean == pytest.approx(0.4)
    assert stats.p50 == pytest.approx(0.3)
    assert stats.p90 == pytest.approx(0.76)
    assert latency_stats([]).p99 is None and latency_stats([]).mean is None


def test_summary_counts_throughput_and_slo_attainment() -> None:
    summary = summarize(RECORDS, slo_ttft_s=0.2, slo_tpot_s=0.05)
    assert (summary.count, summary.ok, summary.errors) == (5, 4, 1)
    assert summary.duration_s == 4.0  # the last request's end
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_tokens_per_s == pytest.approx((10 + 10 + 10 + 1) / 4)
    # Requests 0 and 3 meet both SLOs; the failure counts as a miss.
    assert summary.slo_attainment == pytest.approx(2 / 5)
    assert summary.ttft.p50 == pytest.approx(0.15)
    assert summary.tpot.mean == pytest.approx((0.02 + 0.02 + 0.06) / 3)
    assert summary.e2e.p99 == pytest.approx(0.48 + (0.74 - 0.48) * 0.97)
    assert summarize(RECORDS, slo_ttft_s=1, slo_tpot_s=1).slo_attainment == pytest.approx(4 / 5)
    assert summarize(RECORDS, slo_ttft_s=1, slo_tpot_s=1, duration_s=8.0).request_throughput == 0.5


def test_summary_of_nothing() -> None:
    summary = summarize([], slo_ttft_s=1, slo_tpot_s=1)
    assert (summary.count, summary.duration_s, summary.request_throughput) == (0, 0.0, 0.0)
    assert summary.slo_attainment is None and summary.ttft.p50 is None


def _result() -> BenchResult:
    return BenchResult(
        base_url="http://127.0.0.1:8000",
        model="m",
        records=tuple(RECORDS),
        summary=summarize(RECORDS, slo_ttft_s=0.2, slo_tpot_s=0.05),
    )


def test_json_holds_summary_and_records() -> None:
    data = json.loads(_result().to_json())
    assert data["summary"]["ok"] == 4
    assert data["summary"]["ttft"]["p50"] == pytest.approx(0.15)
    assert data["records"][4]["error"] == "max_tokens too big"
    assert data["records"][4]["http_status"] == 400
    assert len(data["records"]) == 5


def test_table_shows_milliseconds_and_errors() -> None:
    console = Console(record=True, width=140)
    _result().render_table(console)
    text = console.export_text()
    assert "5 (4 / 1)" in text
    assert "40.0%" in text
    assert "150.0" in text  # TTFT p50 in ms
    assert "HTTP 400: max_tokens too big" in text


def test_synthetic_prompts_are_exact_deterministic_and_ordinary() -> None:
    prompt = synthesize_prompt(5000, index=3, seed=7)
    assert len(prompt) == 5000
    assert min(prompt) >= 100 and max(prompt) < 49152
    assert prompt == synthesize_prompt(5000, index=3, seed=7)
    assert prompt != synthesize_prompt(5000, index=4, seed=7)
    assert prompt != synthesize_prompt(5000, index=3, seed=8)
    small = synthesize_prompt(1000, index=0, vocab_size=120)
    assert set(small) <= set(range(100, 120))
    with pytest.raises(ValueError):
        synthesize_prompt(3, index=0, vocab_size=100)
