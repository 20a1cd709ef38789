"""A KV-moving process keeps the memory it frees: a later transfer's buffers fault in no fresh pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
from kv_transfer.exchange.allocator import keep_freed_memory
if {tuned}:
    assert keep_freed_memory(256)
def transfer():  # a transfer's decoded layers: six 2 MiB groups, held together until the load, then freed
    layers = [bytearray(2 << 20) for _ in range(6)]  # zero-filled: every page touched
    del layers
for _ in range(2):  # the first transfers may fault either way
    transfer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
transfer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_later_transfer(tuned: bool) -> int:
    code = PROBE.format(root=str(ROOT), tuned=tuned)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_a_later_transfer_reuses_freed_memory_without_page_faults_once_tuned() -> None:
    pages = (12 << 20) // 4096
    assert faults_of_a_later_transfer(tuned=False) > pages // 2  # glibc trims them: fresh pages again
    assert faults_of_a_later_transfer(tuned=True) < pages // 20


def test_zero_leaves_the_defaults() -> None:
    from kv_transfer.exchange.allocator import keep_freed_memory

    assert keep_freed_memory(0) is False
