"""KV codecs on CPU: wire bytes relative to bf16 and encode/decode throughput, for SmolLM2-shaped (30 layers
x 3 KV heads x 64) and Llama-3-8B-shaped (32 x 8 x 128) KV at 512, 2048 and 8192 tokens, and real SmolLM2 KV.

    .venv/bin/python benchmarks/kv_codecs.py [--tokens 512 2048 8192] [--real-tokens 512 2048] [--no-real]
                                             [--threads 1] [--json results/kv_codecs.json]

Synthetic KV is standard normal bf16. Throughput is raw (bf16) bytes per second over one layer's K and V,
best of ``--repeats`` after a warm-up, with ``--threads`` torch threads (default 1: per-core figures, which
stay stable on a shared machine); model totals are that layer times the layer count. ``none`` hands out
views, so its "throughput" only says it costs nothing. Real KV is what the Hugging Face SmolLM2-135M-Instruct
(bf16, no vLLM) leaves in ``past_key_values`` after a forward pass over the repository's README and design
notes; it is computed once per length and cached under ``.cache/pdflow/kv/``. For it, wire bytes and errors
are over all 30 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kv_transfer.codec import CODEC_NAMES, KVCodec, KVKind, get_codec  # noqa: E402

SHAPES = {"smollm2-135m": (30, 3, 64), "llama-3-8b": (32, 8, 128)}  # layers, KV heads, head dim
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # real text, for real KV
console = Console(width=None if sys.stdout.isatty() else 150)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--codecs", nargs="+", default=list(CODEC_NAMES), choices=CODEC_NAMES)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    p.add_argument("--real-tokens", type=int, nargs="+", default=[512, 2048], help="lengths of real KV")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the codecs")
    p.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 KV")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "kv_codecs.json")
    return p.parse_args()


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, zstd contexts
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(
    codec: KVCodec, layers: list[tuple[torch.Tensor, torch.Tensor]], repeats: int
) -> dict[str, float]:
    """Encode and decode every (K, V) in ``layers``: raw and wire bytes, and GB/s of raw bytes."""
    encoded = [(codec.encode(k, KVKind.KEY), codec.encode(v, KVKind.VALUE)) for k, v in layers]
    raw = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    wire = sum(ek.nbytes + ev.nbytes for ek, ev in encoded)

    def encode_all() -> None:
        for k, v in layers:
            codec.encode(k, KVKind.KEY)
            codec.encode(v, KVKind.VALUE)

    def decode_all() -> None:
        for ek, ev in encoded:
            codec.decode(ek)
            codec.decode(ev)

    encode_s = best_seconds(encode_all, repeats)
    decode_s = best_seconds(decode_all, repeats)
    return {
        "raw_bytes": raw,
        "wire_bytes": wire,
        "ratio": wire / raw,
        "encode_gbps": raw / encode_s / 1e9,
        "decode_gbps": raw / decode_s / 1e9,
    }


def synthetic(args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    gen = torch.Generator().manual_seed(0)
    for model, (num_layers, heads, head_dim) in SHAPES.items():
        for tokens in args.tokens:
            shape = (tokens, heads, head_dim)
            layer = (
                torch.randn(shape, generator=gen).bfloat16(),
                torch.randn(shape, generator=gen).bfloat16(),
            )
            for name in args.codecs:
                m = measure(get_codec(name), [layer], args.repeats)
                m["raw_bytes"] *= num_layers  # one layer measured; every layer has the same shape
                m["wire_bytes"] *= num_layers
                rows.append({"model": model, "tokens": tokens, "codec": name, **m})
                console.print(
                    f"  {model:>13} {tokens:>5} tok {name:>8}: x{m['ratio']:.4f}, "
                    f"enc {m['encode_gbps']:.2f} GB/s, dec {m['decode_gbps']:.2f} GB/s"
                )
    return rows


def real_smollm2_kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``[T, H, D]`` bf16 K and V from the HF SmolLM2 model over real text; cached on disk."""
    cache = ROOT / ".cache" / "pdflow" / "kv" / f"smollm2-135m-bf16-{tokens}.pt"
    if cache.is_file():
        return [(k, v) for k, v in torch.load(cache)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdctl.model_cache import prepare_model

    model_dir = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    text = "\n\n".join(path.read_text() for path in TEXTS if path.is_file())
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < tokens:
        ids = torch.cat([ids, ids], dim=1)
    started = time.perf_counter()
    codec_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the model forward is not what is measured
    try:
        with torch.inference_mode():
            cache_obj = model(ids[:, :tokens], use_cache=True).past_key_values
    finally:
        torch.set_num_threads(codec_threads)
    console.print(f"  SmolLM2 forward over {tokens} tokens: {time.perf_counter() - started:.1f} s")
    layers = [
        (layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
        for layer in cache_obj.layers
    ]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layers, cache)
    return layers


def error_stats(codec: KVCodec, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative RMS error (||x' - x|| / ||x||) and max |x' - x| over all layers, keys and values apart."""
    stats: dict[str, float] = {}
    for kind, index in ((KVKind.KEY, 0), (KVKind.VALUE, 1)):
        sq_err = sq_ref = max_err = 0.0
        for pair in layers:
            x = pair[index]
            diff = codec.decode(codec.encode(x, kind)).float() - x.float()
            sq_err += float(diff.square().sum())
            sq_ref += float(x.float().square().sum())
            max_err = max(max_err, float(diff.abs().max()))
        stats[f"{kind.value}_rel_rmse"] = (sq_err / sq_ref) ** 0.5
        stats[f"{kind.value}_max_abs_err"] = max_err
    return stats


def real(args: argparse.Namespace, tokens: int) -> dict[str, object]:
    layers = real_smollm2_kv(tokens)
    absmax = {
        "key_absmax": max(float(k.abs().max()) for k, _ in layers),
        "value_absmax": max(float(v.abs().max()) for _, v in layers),
    }
    rows = []
    for name in args.codecs:
        codec = get_codec(name)
        m = {**measure(codec, layers, args.repeats), **error_stats(codec, layers)}
        rows.append({"codec": name, **m})
        console.print(
            f"  real {tokens} tok {name:>8}: x{m['ratio']:.4f}, "
            f"rel RMSE K {m['key_rel_rmse']:.2e} V {m['value_rel_rmse']:.2e}, "
            f"max err K {m['key_max_abs_err']:.3g} V {m['value_max_abs_err']:.3g}"
        )
    return {"model": "smollm2-135m", "tokens": tokens, **absmax, "rows": rows}


def print_tables(rows: list[dict[str, object]], real_results: list[dict[str, object]]) -> None:
    table = Table(title="KV codecs on CPU, synthetic normal bf16 KV (whole model)")
    for column in ("model", "tokens", "codec", "bf16 MB", "wire MB", "wire/bf16", "enc GB/s", "dec GB/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["model"]),
            str(r["tokens"]),
            str(r["codec"]),
            f"{float(r['raw_bytes']) / 1e6:.1f}",  # type: ignore[arg-type]
            f"{float(r['wire_bytes']) / 1e6:.1f}",  # type: ignore[arg-type]
            f"{r['ratio']:.4f}",
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
        )
    console.print(table)
    for real_result in real_results:
        print_real_table(real_result)


def print_real_table(real_result: dict[str, object]) -> None:
    table = Table(title=f"Real SmolLM2-135M KV, {real_result['tokens']} tokens, 30 layers")
    for column in (
        "codec",
        "wire/bf16",
        "enc GB/s",
        "dec GB/s",
        "K rel RMSE",
        "V rel RMSE",
        "K max err",
        "V max err",
    ):
        table.add_column(column, justify="right")
    for r in real_result["rows"]:  # type: ignore[attr-defined]
        table.add_row(
            r["codec"],
            f"{r['ratio']:.4f}",
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
            f"{r['key_rel_rmse']:.2e}",
            f"{r['value_rel_rmse']:.2e}",
            f"{r['key_max_abs_err']:.3g}",
            f"{r['value_max_abs_err']:.3g}",
        )
    console.print(table)


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or '?'}"
    )
    console.print("synthetic:")
    rows = synthetic(args)
    real_results = []
    if not args.no_real:
        console.print("real SmolLM2 KV:")
        real_results = [real(args, tokens) for tokens in args.real_tokens]
    print_tables(rows, real_results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "method": "raw bf16 bytes per second, best of repeats, one layer's K and V; totals = layer x layers",
        "repeats": args.repeats,
        "synthetic": rows,
        "real": real_results,
        "seconds": time.perf_counter() - started,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
