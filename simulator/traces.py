"""Request traces in the Azure LLM inference format (Splitwise, 2023):
``TIMESTAMP,ContextTokens,GeneratedTokens``.

``load_trace`` turns one CSV file into frozen ``TraceRequest`` records (arrival relative to the first selected
request, prompt and output lengths) after picking a time window, stretching time, capping the count and
clipping lengths to what a model can serve. The returned ``Trace`` says how much was clipped, so a replay
never quietly serves something other than the trace. The simulator and ``pdctl bench`` replay these records.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_EPOCH = datetime(1970, 1, 1)


class TraceFormatError(ValueError):
    """The file is not an Azure-format trace (wrong header, a malformed row)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds after the first selected request, time scale applied
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Trace:
    """The selected, scaled and clipped requests of one trace file, and what selection and clipping did."""

    source: Path
    requests: tuple[TraceRequest, ...]
    rows_total: int  # data rows in the file
    start_s: float  # window start in trace time (seconds after the file's first row)
    time_scale: float
    prompt_clipped: int  # requests whose prompt was shortened
    output_clipped: int  # requests whose output was shortened
    clipped: int  # requests with either shortened

    @property
    def span_s(self) -> float:
        """Replay time from the first to the last arrival (scaled)."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def describe(self) -> str:
        n = len(self.requests)
        rate = f", {n / self.span_s:.2f} req/s" if self.span_s > 0 else ""
        text = (
            f"{self.source.name}: {n} of {self.rows_total} requests from t={self.start_s:g} s, "
            f"replayed over {self.span_s:.1f} s (time scale {self.time_scale:g}{rate})"
        )
        if self.clipped:
            text += (
                f"; clipped {self.clipped} requests ({self.prompt_clipped} prompts, "
                f"{self.output_clipped} outputs)"
            )
        return text


def parse_timestamp(text: str) -> float:
    """``YYYY-MM-DD HH:MM:SS[.fffffff]`` (any number of fractional digits) to seconds since 1970, naive time.

    The fraction is parsed by hand: ``datetime`` stops at microseconds and the files carry seven digits.
    """
    whole, _, fraction = text.strip().partition(".")
    stamp = datetime.fromisoformat(whole)  # C-implemented; strptime dominates loading otherwise
    if stamp.tzinfo is not None or len(whole) != 19:
        raise ValueError(f"expected YYYY-MM-DD HH:MM:SS[.fffffff], got {text!r}")
    seconds = (stamp - _EPOCH).total_seconds()
    if fraction:
        if not fraction.isdigit():
            raise ValueError(f"bad fractional seconds {fraction!r}")
        seconds += int(fraction) / 10 ** len(fraction)
    return seconds


def clip_lengths(
    prompt_tokens: int,
    output_tokens: int,
    *,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    max_model_len: int | None = None,
) -> tuple[int, int]:
    """Shorten a (prompt, output) pair to the limits. Past ``max_model_len`` the prompt gives way first (down
    to one token), then the output, so that the decode work the trace asks for is kept where it fits."""
    prompt = prompt_tokens if max_prompt_tokens is None else min(prompt_tokens, max_prompt_tokens)
    output = output_tokens if max_output_tokens is None else min(output_tokens, max_output_tokens)
    if max_model_len is not None and prompt + output > max_model_len:
        output = min(output, max_model_len - 1)
        prompt = min(prompt, max_model_len - output)
    return prompt, output


def _read_rows(path: Path) -> list[tuple[float, int, int]]:
    """(timestamp seconds, prompt tokens, output tokens) per data row, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(cell.strip() for cell in header) != HEADER:
            found = "an empty file" if header is None else ",".join(header)
            raise TraceFormatError(
                f"{path}: not an Azure LLM trace: expected header {','.join(HEADER)}, found {found}"
            )
        rows = []
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != 3:
                raise TraceFormatError(f"{path}:{line}: expected 3 fields, found {len(row)}: {','.join(row)}")
            try:
                stamp, prompt, output = parse_timestamp(row[0]), int(row[1]), int(row[2])
            except ValueError as e:
                raise TraceFormatError(f"{path}:{line}: {','.join(row)}: {e}") from None
            if prompt < 1 or output < 1:
                raise TraceFormatError(f"{path}:{line}: token counts must be >= 1: {','.join(row)}")
            rows.append((stamp, prompt, output))
    return rows


def load_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    max_model_len: int | None = None,
) -> Trace:
    """Load an Azure-format trace.

    ``start_s``/``duration_s`` pick the window ``[start_s, start_s + duration_s)`` in trace time (seconds
    after the file's first row); ``max_requests`` keeps the first that many of it. Arrivals are relative to
    the first selected request and multiplied by ``time_scale`` (10 = ten times slower). Lengths are clipped
    by ``clip_lengths``; the counts of clipped requests are on the result.

    Raises ``FileNotFoundError`` (no such file), ``TraceFormatError`` (not this format) and ``ValueError``
    (bad options, or no request in the window).
    """
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    limits = (
        ("max_requests", max_requests, 1),
        ("max_prompt_tokens", max_prompt_tokens, 1),
        ("max_output_tokens", max_output_tokens, 1),
        ("max_model_len", max_model_len, 2),
    )
    for name, value, least in limits:
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")

    source = Path(path)
    rows = _read_rows(source)
    if not rows:
        raise ValueError(f"{source}: the trace has no requests")
    rows.sort(key=lambda row: row[0])  # stable: rows with equal timestamps keep file order
    first = rows[0][0]
    end_s = float("inf") if duration_s is None else start_s + duration_s
    window = [row for row in rows if start_s <= row[0] - first < end_s]
    if max_requests is not None:
        window = window[:max_requests]
    if not window:
        raise ValueError(
            f"{source}: no requests in [{start_s:g}, {end_s:g}) s; the trace spans "
            f"{rows[-1][0] - first:.1f} s"
        )

    origin = window[0][0]
    requests, prompt_clipped, output_clipped, clipped = [], 0, 0, 0
    for stamp, prompt, output in window:
        new_prompt, new_output = clip_lengths(
            prompt,
            output,
            max_prompt_tokens=max_prompt_tokens,
            max_output_tokens=max_output_tokens,
            max_model_len=max_model_len,
        )
        prompt_clipped += new_prompt < prompt
        output_clipped += new_output < output
        clipped += new_prompt < prompt or new_output < output
        requests.append(TraceRequest((stamp - origin) * time_scale, new_prompt, new_output))
    return Trace(
        source=source,
        requests=tuple(requests),
        rows_total=len(rows),
        start_s=start_s,
        time_scale=time_scale,
        prompt_clipped=prompt_clipped,
        output_clipped=output_clipped,
        clipped=clipped,
    )
