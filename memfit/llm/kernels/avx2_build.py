"""Compile and load memfit's AVX2 bf16 kernels (avx2/bf16_linear.cpp): a library of its own beside the AVX-512
family of build.py, for x86 cores with AVX2 + FMA but no AVX-512 (Zen 2/3, Haswell to Alder Lake).

It is built by build.py's builder (same compiler, same cache directory, a key hashed from the source, the flags and
the compiler; temporary name then rename), but with its own flags, so that library's
sources, flags and cache entries are untouched. Any reason it can't be used is logged and turns into None.
"""
from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from memfit.llm.kernels.build import _build, _key_or_none, compiler, cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "avx2" / "bf16_linear.cpp"
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
NEEDS = ("avx2", "fma")  # /proc/cpuinfo flag names

_lock = threading.Lock()
_loaded: dict[str, Avx2Lib | None] = {}
reason: str | None = None  # why the last load failed (None: it did not)


@dataclass
class Avx2Lib:
    """`linear`: (x bf16, ldx, w bf16, b bf16 | None, y bf16, ldy, M, N, K, nthreads) -> None, pointers as ints;
    `peak`: (iters, a, b, nthreads) -> sum of the accumulators (iters x 96 multiply-adds per thread)."""

    path: Path
    linear: ctypes._CFuncPtr
    peak: ctypes._CFuncPtr


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
        key = _key_or_none((SOURCE,), FLAGS)  # build.py's key: sources, flags and compiler hashed
        if key is None:
            return None
        if key in _loaded:
            return _loaded[key]
        lib = None
        try:
            lib = _open(_build(key, (SOURCE,), FLAGS, "avx2_bf16"))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            reason = str(exc)
            log.info("memfit AVX2 bf16 kernels unavailable: %s", exc)
        _loaded[key] = lib
        return lib


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
