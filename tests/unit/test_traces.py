"""Loading the real Azure LLM traces: parsing, windows, time scale, clipping, and errors a user would hit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from simulator.traces import Trace, TraceFormatError, TraceRequest, clip_lengths, load_trace, parse_timestamp

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
CONV = DATA / "AzureLLMInferenceTrace_conv.csv"
CODE = DATA / "AzureLLMInferenceTrace_code.csv"


def test_whole_files_load_with_the_row_counts_the_readme_gives() -> None:
    conv, code = load_trace(CONV), load_trace(CODE)
    assert (len(conv.requests), conv.rows_total) == (19366, 19366)
    assert len(code.requests) == 8819
    assert conv.clipped == conv.prompt_clipped == conv.output_clipped == 0
    assert conv.span_s == pytest.approx(3501.7, abs=0.1)  # 18:15:46.68 to 19:14:08.40


def test_first_rows_of_the_conversation_trace() -> None:
    trace = load_trace(CONV, max_requests=3)
    # 2023-11-16 18:15:46.6805900,374,44 / 18:15:50.9951690,396,109 / 18:15:51.2224670,879,55
    assert trace.requests == (
        TraceRequest(0.0, 374, 44),
        TraceRequest(pytest.approx(4.314579, abs=1e-6), 396, 109),  # type: ignore[arg-type]
        TraceRequest(pytest.approx(4.541877, abs=1e-6), 879, 55),  # type: ignore[arg-type]
    )
    arrivals = [r.arrival_s for r in load_trace(CONV).requests]
    assert arrivals == sorted(arrivals)


def test_seven_fractional_digits_are_kept() -> None:
    base = parse_timestamp("2023-11-16 18:15:46")
    assert parse_timestamp("2023-11-16 18:15:46.6805900") - base == pytest.approx(0.68059, abs=1e-6)
    assert parse_timestamp("2023-11-16 18:15:46.0000001") - base == pytest.approx(1e-7, abs=1e-6)
    assert parse_timestamp("2023-11-17 00:00:00.5") - parse_timestamp("2023-11-16 23:59:59.5") == 1.0


def test_first_minute_window() -> None:
    minute = load_trace(CONV, duration_s=60)
    assert len(minute.requests) == 191
    assert minute.span_s < 60
    assert "191 of 19366 requests" in minute.describe()


def test_start_offset_rebases_arrivals_on_the_first_request_in_the_window() -> None:
    whole = load_trace(CONV, duration_s=120)
    later = load_trace(CONV, start_s=60, duration_s=60)
    first_minute = sum(r.arrival_s < 60 for r in whole.requests)
    tail = whole.requests[first_minute:]
    assert later.requests[0].arrival_s == 0.0
    assert [(r.prompt_tokens, r.output_tokens) for r in later.requests] == [
        (r.prompt_tokens, r.output_tokens) for r in tail
    ]
    offset = tail[0].arrival_s
    assert [r.arrival_s for r in later.requests] == pytest.approx([r.arrival_s - offset for r in tail])


def test_time_scale_stretches_arrivals_and_keeps_lengths() -> None:
    plain = load_trace(CONV, duration_s=60)
    slow = load_trace(CONV, duration_s=60, time_scale=10)
    assert [r.arrival_s for r in slow.requests] == pytest.approx([10 * r.arrival_s for r in plain.requests])
    assert [r.prompt_tokens for r in slow.requests] == [r.prompt_tokens for r in plain.requests]
    assert slow.span_s == pytest.approx(10 * plain.span_s)
    fast = load_trace(CONV, duration_s=60, time_scale=0.5)
    assert fast.span_s == pytest.approx(plain.span_s / 2)


def test_max_requests_keeps_the_first_ones() -> None:
    trace = load_trace(CONV, start_s=100, max_requests=7)
    assert len(trace.requests) == 7
    assert trace.requests == load_trace(CONV, start_s=100, duration_s=600).requests[:7]


def test_clip_lengths_rules() -> None:
    assert clip_lengths(500, 100) == (500, 100)
    assert clip_lengths(500, 100, max_prompt_tokens=256, max_output_tokens=64) == (256, 64)
    # Past the context, the prompt gives way first ...
    assert clip_lengths(1900, 300, max_model_len=2048) == (1748, 300)
    # ... down to one token; then the output does.
    assert clip_lengths(10, 5000, max_model_len=2048) == (1, 2047)
    assert clip_lengths(2000, 48, max_model_len=2048) == (2000, 48)


def test_clipping_to_a_context_limit_is_counted() -> None:
    raw = load_trace(CONV, duration_s=600)
    clipped = load_trace(CONV, duration_s=600, max_model_len=2048, max_output_tokens=256)
    assert all(r.prompt_tokens + r.output_tokens <= 2048 for r in clipped.requests)
    assert all(r.output_tokens <= 256 for r in clipped.requests)
    pairs = list(zip(raw.requests, clipped.requests, strict=True))
    assert clipped.output_clipped == sum(b.output_tokens < a.output_tokens for a, b in pairs) > 0
    assert clipped.prompt_clipped == sum(b.prompt_tokens < a.prompt_tokens for a, b in pairs) > 0
    assert clipped.clipped == sum(a != b for a, b in pairs)
    assert f"clipped {clipped.clipped} requests" in clipped.describe()


def test_trace_requests_are_frozen() -> None:
    request = load_trace(CODE, max_requests=1).requests[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.prompt_tokens = 1  # type: ignore[misc]
    assert isinstance(load_trace(CODE, max_requests=1), Trace)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"trace file not found: .*nope\.csv"):
        load_trace(missing)


def test_wrong_header_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("time,prompt,output\n2023-11-16 18:15:46.6805900,374,44\n")
    with pytest.raises(TraceFormatError, match="expected header TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_trace(path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TraceFormatError, match="found an empty file"):
        load_trace(empty)


def test_bad_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.1,lots,44\n"
    )
    with pytest.raises(TraceFormatError, match=r"bad.csv:3: "):
        load_trace(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,0")
    with pytest.raises(TraceFormatError, match=r"bad.csv:2: token counts must be >= 1"):
        load_trace(path)


def test_bad_options_and_empty_windows() -> None:
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        load_trace(CONV, time_scale=0)
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        load_trace(CONV, max_model_len=1)
    with pytest.raises(ValueError, match=r"no requests in \[5000, inf\) s; the trace spans 3501.7 s"):
        load_trace(CONV, start_s=5000)
