"""KV transfer benchmark: per codec, wire bytes relative to bf16, encode and decode GB/s, and end-to-end
delivery time between two processes over real NIXL/UCX, on loopback and on emulated 10 and 1 Gbit/s links
(a veth pair between two network namespaces, shaped with ``tc tbf``; needs root), against a raw bf16 move.

    .venv/bin/python benchmarks/kv_transfer.py                      # everything, 3 runs each (15 on loopback)
    .venv/bin/python benchmarks/kv_transfer.py --links loopback --tokens 512,2048 --shapes smollm2
    .venv/bin/python benchmarks/kv_transfer.py --links loopback --codecs raw,none,auto --repeats 15

Delivery: every layer is ready at t0 (prefill done); t0 → the last layer decoded on the receiver. The sender
encodes layer by layer and writes each layer as soon as it is encoded, through pdflow's ``KVEndpoint``
(codec ``none``, with nothing to encode, queues every layer at once and posts one write from the registered
cache, as a migration's push does; layer by layer the first went alone and the rest after it); the
receiver decodes each layer as it lands (``decode_s``: all its decoding; ``load_s``: what was left at the
load; ``--no-early-decode`` decodes everything at the load instead). The baseline, "raw", moves the bf16
bytes of every layer straight from its registered KV tensor, K and V as one span each, in one write with
no codec, no staging copy and no checksum: what vLLM's ``NixlConnector`` moves (it reads the raw blocks of
each layer's registered cache in one NIXL transfer, with one descriptor per block, so at least as many as
here). pdflow's codec ``none`` with every layer ready takes the same path, so ``none`` and ``raw`` differ
by noise only; ``auto`` adds its choice. ``auto`` is the adaptive policy (probe at first contact, floor
int4), deciding per transfer and learning from each as the connector does (link bandwidth, real encode
speed). Pipelining: layers computed at an emulated rate (``--layer-ms``), each sent as
it is done; the tail after the last layer, as a fraction of the unpipelined transfer. The KV is random normal
bf16 (lossless compresses real KV about as well: 0.68 vs 0.676 measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"smollm2": (30, 3, 64), "llama3-8b": (32, 8, 128)}  # layers, KV heads, head dim
CODECS = ("none", "lossless", "fp8", "int8", "int4")
NS_SEND, NS_RECV = "pdflow-bench-p", "pdflow-bench-d"
IP_SEND, IP_RECV = "10.77.0.1", "10.77.0.2"
_EARLY_ENV = "PDFLOW_BENCH_EARLY_DECODE"  # how the driver tells the receiver process


# ---- the two processes ----


def _endpoint(name: str, host: str, arena_mib: int) -> tuple[Any, Any]:
    """(endpoint, its NIXL transport)."""
    from kv_transfer.exchange.allocator import keep_freed_memory
    from kv_transfer.exchange.endpoint import KVEndpoint
    from kv_transfer.transport.nixl import NixlTransport
    from protocol.auth import Credentials
    from protocol.kv_config import KVTransferConfig

    keep_freed_memory(KVTransferConfig().keep_freed_mib)  # as the connector does in an engine's process
    early = None if os.environ.get(_EARLY_ENV, "1") == "1" else 0
    transport = NixlTransport(name, arena_mib << 20)
    secret = Credentials.from_env().cluster_secret  # needed to bind an address other than loopback
    endpoint = KVEndpoint(
        transport, host=host, timeout_s=120, lease_s=300, predecode_bytes=early, secret=secret
    )
    return endpoint, transport


def serve(host: str, arena_mib: int) -> None:
    """Receiver: decode every transfer that lands, print one JSON line per transfer."""
    endpoint, _ = _endpoint("bench-recv", host, arena_mib)
    print(json.dumps({"ready": endpoint.address}), flush=True)
    while True:
        for tid in endpoint.landed_ids():
            incoming = endpoint.take(tid)
            if incoming is None:
                continue
            started = time.perf_counter()
            for _ in endpoint.decode_layers(incoming):
                pass
            load_s = time.perf_counter() - started
            done_at = time.time()
            endpoint.release(tid, decode_s=load_s)
            decode_s = sum(r.decode_s for r in endpoint.drain_records() if r.transfer_id == tid)
            print(
                json.dumps({"tid": tid, "done_at": done_at, "decode_s": decode_s, "load_s": load_s}),
                flush=True,
            )
        time.sleep(0.0005)


def send(host: str, arena_mib: int, destination: str) -> None:
    """Sender: read jobs from stdin, run each, print the sender's record as JSON."""
    import torch

    from kv_transfer.codec import get_codec
    from kv_transfer.vllm.codec_chooser import CodecChooser, measure_profiles
    from protocol.kv_config import KVQualityFloor

    endpoint, transport = _endpoint("bench-send", host, arena_mib)
    cache: dict[tuple[str, int], list[tuple[Any, Any]]] = {}  # kept: registered with NIXL
    choosers: dict[str, CodecChooser] = {}
    print(json.dumps({"ready": endpoint.address}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        layers_n, heads, dim = SHAPES[job["shape"]]
        key = (job["shape"], job["tokens"])
        if key not in cache:
            gen = torch.Generator().manual_seed(0)
            # one tensor per layer, keys then values, as vLLM's KV cache; registered once, at engine start
            kv = [
                torch.randn(2, job["tokens"], heads, dim, generator=gen).to(torch.bfloat16)
                for _ in range(layers_n)
            ]
            for layer in kv:
                transport.register(layer)
            cache[key] = [(layer[0], layer[1]) for layer in kv]
        layers = cache[key]
        raw = sum(k.numel() * 4 for k, _ in layers)
        codec_name, reason = job["codec"], ""
        if codec_name == "auto":
            chooser = choosers.get(job["shape"])
            if chooser is None:
                profiles = measure_profiles((2048, heads, dim), torch.bfloat16, 64)
                chooser = CodecChooser(profiles, layers=layers_n, floor=KVQualityFloor.INT4)
                choosers[job["shape"]] = chooser
                chooser.bind_probe(endpoint.probe)
                chooser.choose(destination, raw)  # first contact starts the link's probe, off this thread
                chooser.probed(destination, timeout_s=60)  # timed transfers start once it is measured
            choice = chooser.choose(destination, raw)
            codec_name, reason = choice.codec, choice.reason
        if job["codec"] == "raw":  # NixlConnector's move: each layer's registered KV, one write, no codec
            codec_name = "none"
        codec = get_codec(
            codec_name, **({"group_size": job["group"]} if codec_name in ("fp8", "int8", "int4") else {})
        )
        out = endpoint.open(
            job["tid"],
            "bench",
            destination,
            layers=layers_n,
            raw_bytes=raw,
            tokens=job["tokens"],
            codec=codec,
            reason=reason,
        )
        layer_s = job.get("layer_ms", 0) / 1000
        t0 = time.time()
        if codec.name == "none" and not layer_s:  # every layer ready: queued together, one write
            endpoint.send_layers_from(out, [(i, *_registered(k, v)) for i, (k, v) in enumerate(layers)])
        for i, (k, v) in enumerate(layers if codec.name != "none" or layer_s else ()):
            if layer_s:
                time.sleep(layer_s)  # the emulated prefill of this layer
            if codec.name == "none":  # as the connector sends each layer once it is computed
                endpoint.send_layer_from(out, i, *_registered(k, v))
            else:
                endpoint.send_layer(out, i, k, v, hold=True)  # the cache is not written meanwhile
        record = endpoint.finish(out)
        if job["codec"] == "auto":  # learns as the connector does: link bandwidth, real encode speed
            choosers[job["shape"]].observe(
                destination,
                record.wire_bytes,
                record.wire_s,
                codec=record.codec,
                raw_bytes=record.raw_bytes,
                encode_s=record.encode_s,
            )
        print(json.dumps({"t0": t0, **record.to_dict()}), flush=True)


def _registered(key: Any, value: Any) -> tuple[Any, Any]:
    """A layer's K and V as codec ``none`` sends them: straight from the registered KV cache."""
    from kv_transfer.codec import KVHeader, KVKind
    from kv_transfer.exchange.outgoing import RegisteredKV
    from protocol.kv_config import KVCodecKind

    def one(kind: KVKind, t: Any) -> RegisteredKV:
        header = KVHeader(KVCodecKind.NONE, kind, tuple(t.shape), t.dtype)
        return RegisteredKV(header, [(t.data_ptr(), t.nbytes)])

    return one(KVKind.KEY, key), one(KVKind.VALUE, value)


# ---- links ----


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def shaped_link(
    shape: tuple[str, str] | None,
) -> Iterator[tuple[list[str], list[str], str, str, dict[str, str]]]:
    """(sender prefix, receiver prefix, sender host, receiver host, UCX env) for one link, shaped to
    ``(rate, burst)``: the burst is 8 ms at line rate (the token bucket needs at least one timer tick's
    worth; a larger one lets a small transfer through faster than the link would)."""
    if shape is None:
        yield [], [], "127.0.0.1", "127.0.0.1", {"UCX_NET_DEVICES": "lo"}
        return
    for ns in (NS_SEND, NS_RECV):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", "pdb-p", "type", "veth", "peer", "name", "pdb-d")
        _sh("ip", "link", "set", "pdb-p", "netns", NS_SEND)
        _sh("ip", "link", "set", "pdb-d", "netns", NS_RECV)
        for ns, dev, ip in ((NS_SEND, "pdb-p", IP_SEND), (NS_RECV, "pdb-d", IP_RECV)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                shape[0],
                "burst",
                shape[1],
                "latency",
                "100ms",
            )
        env = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "pdb-p,pdb-d"}
        yield ["ip", "netns", "exec", NS_SEND], ["ip", "netns", "exec", NS_RECV], IP_SEND, IP_RECV, env
    finally:
        for ns in (NS_SEND, NS_RECV):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class _Proc:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def line(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        while True:
            text = self.p.stdout.readline()
            if not text:
                raise RuntimeError(f"{self.p.args!r} exited with {self.p.wait()}")
            if text.startswith("{"):
                return dict(json.loads(text))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def run_link(
    name: str, shape: tuple[str, str] | None, jobs: list[dict[str, Any]], arena_mib: int
) -> list[dict[str, Any]]:
    rows = []
    with shaped_link(shape) as (sp, rp, shost, rhost, ucx):
        env = {**os.environ, "NIXL_LOG_LEVEL": "WARN", "OMP_NUM_THREADS": "1", **ucx}
        me = [sys.executable, str(Path(__file__).resolve())]
        recv = _Proc([*rp, *me, "--serve", "--host", rhost, "--arena-mib", str(arena_mib)], env)
        dest = recv.line()["ready"]
        sender = _Proc([*sp, *me, "--send", dest, "--host", shost, "--arena-mib", str(arena_mib)], env)
        sender.line()
        try:
            # Warm-up, not recorded: one transfer of each kind at each shape's first size, so that no
            # measured one pays the UCX connection's set-up (18-44 ms on the first transfer between two
            # processes) or a codec's first call.
            warm = {(j["shape"], j["job_codec"]): j for j in reversed(jobs) if "layer_ms" not in j}
            for i, job in enumerate(warm.values()):
                sender.send({**job, "tid": f"{name}-warm-{i}"})
                sender.line()
                recv.line()
            for i, job in enumerate(jobs):
                job = {**job, "tid": f"{name}-{i}"}
                sender.send(job)
                record = sender.line()
                landed = recv.line()
                delivery = landed["done_at"] - record["t0"]
                rows.append(
                    {
                        **job,
                        "link": name,
                        **record,
                        "decode_s": landed["decode_s"],
                        "load_s": landed["load_s"],
                        "delivery_s": delivery,
                    }
                )
                _progress(rows[-1])
        finally:
            sender.stop()
            recv.stop()
    return rows


def _progress(r: dict[str, Any]) -> None:
    print(
        f"  {r['link']:>8} {r['shape']:>9} {r['tokens']:>5} {r['job_codec']:>8} -> {r['codec']:>8}: "
        f"{r['wire_bytes'] / r['raw_bytes']:.3f}x, delivery {r['delivery_s'] * 1e3:8.1f} ms",
        file=sys.stderr,
        flush=True,
    )


# ---- driver ----


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--send", metavar="DEST", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--arena-mib", type=int, default=2560, help="staging memory per side")
    ap.add_argument("--links", default="loopback,10gbit,1gbit")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--shapes", default="smollm2,llama3-8b")
    ap.add_argument("--group", type=int, default=64, help="group size of fp8/int8/int4 scales")
    ap.add_argument(
        "--codecs", default=",".join(("raw", *CODECS, "auto")), help="comma-separated: raw, codecs, auto"
    )
    ap.add_argument("--no-early-decode", action="store_true", help="decode every layer at the load")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each transfer; the median is reported")
    ap.add_argument(
        "--loopback-repeats",
        type=int,
        default=15,
        help="runs of each loopback transfer, at least --repeats (milliseconds each, and noisy on a shared "
        "machine: at 5 runs, two paths that are the same code differed by up to 17%%)",
    )
    ap.add_argument(
        "--layer-ms",
        type=float,
        default=350.0,
        help="emulated prefill time per layer for the pipelining run (SmolLM2 CPU, 8192 tokens)",
    )
    ap.add_argument("--json", default=str(ROOT / "results" / "kv_transfer.json"))
    args = ap.parse_args()
    os.environ[_EARLY_ENV] = "0" if args.no_early_decode else os.environ.get(_EARLY_ENV, "1")
    if args.serve:
        serve(args.host, args.arena_mib)
        return
    if args.send:
        send(args.host, args.arena_mib, args.send)
        return

    links = {"loopback": None, "10gbit": ("10gbit", "10mb"), "1gbit": ("1gbit", "1mb")}
    kinds = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = set(kinds) - {"raw", *CODECS, "auto"}
    if unknown:
        ap.error(f"unknown codecs {sorted(unknown)}: use raw, auto or {', '.join(CODECS)}")
    all_rows: list[dict[str, Any]] = []
    for link in args.links.split(","):
        jobs = []
        for shape in args.shapes.split(","):
            for tokens in (int(t) for t in args.tokens.split(",")):
                # each run starts one further along the list, so that no kind always follows the same
                # one (auto after int4 ran in a machine still busy with int4's aftermath)
                repeats = max(args.repeats, args.loopback_repeats) if link == "loopback" else args.repeats
                turns = [kinds[r % len(kinds) :] + kinds[: r % len(kinds)] for r in range(repeats)]
                for codec in [c for turn in turns for c in turn]:
                    jobs.append(
                        {
                            "shape": shape,
                            "tokens": tokens,
                            "codec": codec,
                            "job_codec": codec,
                            "group": args.group,
                        }
                    )
        if link == "1gbit" and "8192" in args.tokens and "smollm2" in args.shapes:
            for codec in ("none", "int8"):
                jobs.append(
                    {
                        "shape": "smollm2",
                        "tokens": 8192,
                        "codec": codec,
                        "job_codec": f"{codec}+pipe",
                        "group": args.group,
                        "layer_ms": args.layer_ms,
                    }
                )
        print(f"link {link}: {len(jobs)} transfers", file=sys.stderr, flush=True)
        all_rows += median_rows(run_link(link, links[link], jobs, args.arena_mib))
    report(all_rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(all_rows, indent=1))
    print(f"\nrows written to {args.json}")


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (link, shape, tokens, codec): the run with the median delivery time, with every run's
    delivery time beside it (``delivery_runs_s``)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["link"], r["shape"], r["tokens"], r["job_codec"]), []).append(r)
    out = []
    for runs in groups.values():
        ranked = sorted(runs, key=lambda r: r["delivery_s"])
        out.append({**ranked[(len(ranked) - 1) // 2], "delivery_runs_s": [r["delivery_s"] for r in runs]})
    return out


def report(rows: list[dict[str, Any]]) -> None:
    by = {(r["link"], r["shape"], r["tokens"], r["job_codec"]): r for r in rows}
    print(
        "\n| link | shape | tokens | codec | wire/bf16 | encode GB/s | decode GB/s | delivery ms | vs raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "+pipe" in r["job_codec"]:
            continue
        raw = by.get((r["link"], r["shape"], r["tokens"], "raw"))
        speed = raw["delivery_s"] / r["delivery_s"] if raw else float("nan")
        enc = (
            r["raw_bytes"] / r["encode_s"] / 1e9
            if r["encode_s"] and r["job_codec"] != "raw"
            else float("nan")
        )
        dec = r["raw_bytes"] / r["decode_s"] / 1e9 if r["decode_s"] > 1e-4 else float("nan")
        label = r["job_codec"] if r["job_codec"] != "auto" else f"auto ({r['codec']})"
        print(
            f"| {r['link']} | {r['shape']} | {r['tokens']} | {label} | "
            f"{r['wire_bytes'] / r['raw_bytes']:.3f} | "
            f"{enc:.2f} | {dec:.2f} | {r['delivery_s'] * 1e3:.1f} | {speed:.2f}x |"
        )
    pipes = [r for r in rows if "+pipe" in r["job_codec"]]
    for p in pipes:
        codec = p["job_codec"].split("+")[0]
        flat = by.get((p["link"], p["shape"], p["tokens"], codec))
        if flat:
            print(
                f"\npipelining ({p['link']}, {p['shape']}, {p['tokens']} tokens, {codec}): "
                "tail after the last "
                f"layer {p['tail_s'] * 1e3:.1f} ms vs unpipelined transfer {flat['delivery_s'] * 1e3:.1f} ms "
                f"= {p['tail_s'] / flat['delivery_s']:.3f}"
            )


if __name__ == "__main__":
    main()
