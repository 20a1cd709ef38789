"""The int8 and int4 codecs' CPU kernels (``affine_kernels.c``), built with the C compiler at first use and
called through ``ctypes``.

Why: on the CPU the torch path costs about ten passes over an fp32 copy of the KV, and on a small machine
that CPU is what a compressed transfer waits for (SmolLM2, 512 tokens, int4 over 1 Gbit/s: the sender's
encoding and the receiver's decoding took most of two vCPUs). The kernels read each quantization group once,
into cache, and produce the same bytes as the torch path (tests check it), so either side of a transfer may
use either. ``ctypes`` releases the GIL for the call.

The library is built once per source, compiler and CPU into ``PDFLOW_NATIVE_CACHE`` (default
``~/.cache/pdflow``), with ``-march=native``. Without a compiler, or with ``PDFLOW_NATIVE_CODECS=0``, the
codecs keep the torch path (logged once). GPU tensors always take the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kv_transfer.codec.rounding import LOG_SCALE_TABLE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("affine_kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
"""``-ffp-contract=off``: each multiply and add rounds on its own, as in torch's passes (the bytes must match;
decoding asks for its multiply-add explicitly)."""
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BUILD_TIMEOUT_S = 120.0

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_TABLE = LOG_SCALE_TABLE.contiguous()
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def enabled() -> bool:
    """Whether the kernels may be used (``PDFLOW_NATIVE_CODECS=0`` turns them off)."""
    return os.environ.get("PDFLOW_NATIVE_CODECS", "1") != "0"


def library() -> ctypes.CDLL | None:
    """The built kernels, building them on the first call; None where they cannot be built or are off."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load(_build())
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("pdflow: int8/int4 CPU kernels unavailable, using the torch path: %s", exc)
            _tried = True
    return _library


def _build() -> Path:
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    identity = hashlib.sha256(
        source + " ".join((compiler, *FLAGS)).encode() + _cpu_identity().encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("PDFLOW_NATIVE_CACHE") or Path.home() / ".cache" / "pdflow")
    target = cache / f"affine-{identity}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=cache, suffix=".so")  # built aside, then renamed: racing builds agree
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", scratch, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if done.returncode:
            raise OSError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-400:]}")
        os.chmod(scratch, 0o755)  # mkstemp's 0600, which the compiler keeps
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return target


def _cpu_identity() -> str:
    """The CPU's instruction sets: a library built with ``-march=native`` runs only where they all are."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.pdflow_affine_encode.argtypes = [_INT, _P, _I64, _I64, _I64, _INT, _I64, _INT, _P, _P, _P, _P, _P]
    lib.pdflow_affine_encode.restype = _INT
    lib.pdflow_affine_decode.argtypes = [_INT, _P, _I64, _I64, _I64, _INT, _I64, _INT, _P, _P, _P, _P]
    lib.pdflow_affine_decode.restype = _INT
    return lib


def usable(kv: torch.Tensor, *parts: torch.Tensor) -> bool:
    """Whether ``kv`` (and a payload's ``parts``) can go through the kernels: CPU and contiguous."""
    return (
        kv.is_cpu
        and kv.dtype in DTYPES
        and all(t.is_contiguous() and t.is_cpu for t in (kv, *parts))
        and library() is not None
    )


def encode(
    kv: torch.Tensor,
    keys: bool,
    group_size: int,
    bits: int,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
) -> tuple[float, float]:
    """Code contiguous ``kv`` into ``codes``, ``scale`` and ``zero`` (contiguous, sized as ``affine`` sizes
    them). Returns its smallest and largest element, NaN for both if it holds a NaN."""
    extremes = (ctypes.c_float * 2)()
    if _run("pdflow_affine_encode", kv, keys, group_size, bits, (codes, scale, zero), extremes):
        return float("nan"), float("nan")
    return float(extremes[0]), float(extremes[1])


def decode(
    out: torch.Tensor,
    keys: bool,
    group_size: int,
    bits: int,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
) -> None:
    """Decode into contiguous ``out`` (``[T, H, D]``, its dtype the payload's)."""
    _run("pdflow_affine_decode", out, keys, group_size, bits, (codes, scale, zero))


def _run(
    kernel: str,
    kv: torch.Tensor,
    keys: bool,
    group_size: int,
    bits: int,
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *extra: object,
) -> int:
    """Call ``kernel`` on ``kv`` (the input, or the output) and the payload's ``parts``; its status."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available")
    tokens, heads, head_dim = kv.shape
    status = int(
        getattr(lib, kernel)(
            DTYPES[kv.dtype],
            kv.data_ptr(),
            tokens,
            heads,
            head_dim,
            int(keys),
            group_size,
            bits,
            _TABLE.data_ptr(),
            *(part.data_ptr() for part in parts),
            *extra,
        )
    )
    if status < 0:
        raise MemoryError("int8/int4 CPU kernel: out of memory")
    return status
