"""NIXL's progress thread: what it costs idle and how fast it moves bytes, with NIXL's own busy-polling thread
(``pthrDelay`` 0, what its Python API sets) against pdflow's (``PROGRESS_DELAY_US``: the thread waits for UCX
events between rounds). Two processes, one ``NixlTransport`` each, WRITEs of 1, 64 and 256 MiB from one
buffer into the other; UCX picks its transports (shared memory on one host) unless ``--tls`` names them.

    .venv/bin/python benchmarks/nixl_progress.py [--tls tcp,self] [--delays none,100,1000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (1 << 20, 64 << 20, 256 << 20)


def _transport(name: str, delay: int | None, capacity: int) -> Any:
    from kv_transfer.transport.nixl import NixlTransport

    return NixlTransport(name, capacity, progress_delay_us=delay)


def _target(conn: Any, delay: int | None) -> None:
    transport = _transport("target", delay, max(SIZES))
    conn.send(transport.peer_info())
    cpu, wall = time.process_time(), time.monotonic()
    conn.recv()  # the initiator is done
    conn.send((time.process_time() - cpu) / (time.monotonic() - wall))
    transport.close()


def _measure(delay: int | None, idle_s: float, repeats: int) -> dict[str, Any]:
    from kv_transfer.transport.base import XferState

    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_target, args=(child, delay))
    proc.start()
    try:
        peer = parent.recv()
        transport = _transport("initiator", delay, max(SIZES))
        transport.add_peer(peer)
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(idle_s)
        idle = (time.process_time() - cpu) / (time.monotonic() - wall)
        rates = {}
        for size in SIZES:
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                xfer = transport.write("target", 0, 0, size)
                while (state := xfer.state()) is XferState.PENDING:
                    time.sleep(0)
                xfer.release()
                if state is not XferState.DONE:
                    raise RuntimeError(f"WRITE of {size} B failed")
                best = min(best, time.perf_counter() - started)
            rates[size] = size / best / 1e9
        parent.send("done")
        target_cpu = parent.recv()
        transport.close()
    finally:
        proc.join(timeout=30)
    return {"delay": delay, "idle_cores": idle, "target_cores": target_cpu, "gb_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", default="", help="UCX_TLS for both processes (default: UCX decides)")
    parser.add_argument("--delays", default="none,1000", help="progress delays in µs; 'none': NIXL's own")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    if args.tls:
        os.environ["UCX_TLS"] = args.tls
    print(f"UCX_TLS={os.environ.get('UCX_TLS', '(default)')}")
    print(
        f"{'progress delay':>16} {'idle cores':>10} {'target cores':>12} "
        + " ".join(f"{s >> 20:>5} MiB GB/s" for s in SIZES)
    )
    for token in args.delays.split(","):
        delay = None if token == "none" else int(token)
        row = _measure(delay, args.idle_s, args.repeats)
        label = "NIXL's (0, spins)" if delay is None else f"{delay} µs"
        print(
            f"{label:>16} {row['idle_cores']:>10.2f} {row['target_cores']:>12.2f} "
            + " ".join(f"{row['gb_s'][s]:>14.2f}" for s in SIZES),
            flush=True,
        )


if __name__ == "__main__":
    main()
