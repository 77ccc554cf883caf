"""Compile and load memfit's AVX2 bf16 kernels (avx2/bf16_linear.cpp): a library of its own beside the AVX-512
family of build.py, for x86 cores with AVX2 + FMA but no AVX-512 (Zen 2/3, Haswell to Alder Lake).

It is built the way build.py builds the AVX-512 one (same compiler, same cache directory, a key hashed from the
source, the flags and the compiler; temporary name then rename), but with its own flags, so that library's
sources, flags and cache entries are untouched. Any reason it can't be used is logged and turns into None.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from memfit.llm.kernels.build import cache_dir, compiler, cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "avx2" / "bf16_linear.cpp"
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
NEEDS = ("avx2", "fma")  # /proc/cpuinfo flag names

_lock = threading.Lock()
_loaded: dict[str, Avx2Lib | None] = {}
reason: str | None = None  # why the last load failed (None: it did not)


@dataclass
class Avx2Lib:
    """`linear`: (x f32, ldx, w bf16, b bf16 | None, y bf16, ldy, M, N, K, nthreads) -> None, pointers as ints;
    `peak`: (iters, a, b, nthreads) -> sum of the accumulators (iters x 96 multiply-adds per thread)."""

    path: Path
    linear: ctypes._CFuncPtr
    peak: ctypes._CFuncPtr


def _key(cxx: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join((os.path.realpath(cxx), *FLAGS)).encode())
    return h.hexdigest()[:16]


def load_avx2() -> Avx2Lib | None:
    """Build (once per cache) and load the library; None (reason logged, in `reason`) where it can't run."""
    global reason
    missing = [f for f in NEEDS if f not in cpu_flags()]
    cxx = compiler()
    with _lock:
        why = (f"the CPU lacks {', '.join(missing)}" if missing else
               "no C++ compiler found (set CXX or install g++)" if cxx is None else
               None if SOURCE.is_file() else f"{SOURCE} is missing from this install")
        if why is not None:
            reason = why
            log.info("memfit AVX2 bf16 kernels unavailable: %s", why)
            return None
        key = _key(cxx)
        if key in _loaded:
            return _loaded[key]
        lib = None
        try:
            lib = _open(_build(cxx, key))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            reason = str(exc)
            log.info("memfit AVX2 bf16 kernels unavailable: %s", exc)
        _loaded[key] = lib
        return lib


def _build(cxx: str, key: str) -> Path:
    out_dir = cache_dir()
    target = out_dir / f"avx2_bf16-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            raise RuntimeError(f"compiling {SOURCE.name} with {cxx} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(path: Path) -> Avx2Lib:
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    linear = lib.memfit_avx2_linear_bf16
    linear.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    linear.restype = None
    peak = lib.memfit_avx2_peak_macs
    peak.argtypes = [i64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    peak.restype = ctypes.c_double
    return Avx2Lib(path, linear, peak)
