"""Compile memfit's C++ CPU kernels on first use and load them with ctypes.

The source is built with the system C++ compiler (`$CXX`, else g++/c++) into a cache directory
(`$MEMFIT_CACHE_DIR`, else `~/.cache/memfit/kernels/`), named by a hash of the source, the flags and the
compiler, so each combination compiles once per machine (about a second; no torch headers) and later
processes just load it. Any reason the kernel can't be used (no compiler, a CPU without the instructions,
a failed build) is logged and turns into `None`: callers fall back to PyTorch/oneDNN.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The SSD swap tier's CRC-32C and O_DIRECT loop (kv/swap_ssd.py), and the swap tiers' strided row copy
# (copy_rows.py), need only SSE4.2, not AVX-512: they are a small library of their own (`load_cpu_io`), so a CPU
# without AVX-512 does not fall back to zlib's CRC-32 and the Python I/O loop (on an AVX2 host that made a 0.5B
# shape's SSD swaps run at about half the C loop's rate).
_HERE = Path(__file__).parent
IO_SOURCES = (_HERE / "cpu_copy_rows.cpp", _HERE / "cpu_crc32c.cpp", _HERE / "cpu_staged_io.cpp")
IO_HEADERS = (_HERE / "staged_aio.hpp",)  # included by cpu_staged_io.cpp: part of its cache key
IO_FLAGS = ("-O3", "-std=c++17", "-msse4.2", "-fPIC", "-shared")
# Every other C++ source beside this file goes into one library (cpu_linear.cpp: decode matmuls; cpu_decode.cpp:
# the rest of a decode step), so one compile and one cache entry cover them all.
SOURCES = tuple(sorted(p for p in _HERE.glob("*.cpp") if p not in IO_SOURCES))
HEADERS = tuple(sorted(_HERE.glob("*.h")))  # included by the sources: part of the cache key
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC", "-shared")
# What each dtype's kernel needs from the CPU (flag names as in /proc/cpuinfo).
NEEDS = {torch.float32: ("avx512f", "avx512bw", "avx512vl"), torch.bfloat16: ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")}

_lock = threading.Lock()
_loaded: dict[str, CpuLinearLib | None] = {}  # cache key -> library (None: failed, with the reason logged)
_reasons: dict[str, str] = {}
# What the cache key and the CPU's flags are read from does not change while a process runs, and reading it was
# the cost of every availability check (the sources hashed, /proc/cpuinfo parsed: 0.2-0.9 ms a call, paid by
# every decode-mode query): each is read once. The key is remembered per compiler setting (CXX, PATH), sources
# and flags, so a test or user that points CXX elsewhere still gets the key of that compiler; "no compiler" is
# not remembered.
_keys: dict[tuple, str] = {}
_proc_flags: frozenset[str] | None = None
compile_count = 0  # compiles done by this process (the tests check that a cached build is reused)


@dataclass
class CpuLinearLib:
    """The loaded kernels. `bf16`/`f32`: (x, ldx, w, b, y, ldy, M, N, K, nthreads) -> None, pointers as ints;
    `cdll` gives the library's other functions (memfit.llm.kernels.decode declares their signatures)."""

    path: Path
    bf16: ctypes._CFuncPtr
    f32: ctypes._CFuncPtr
    cdll: ctypes.CDLL


def cache_dir() -> Path:
    env = os.environ.get("MEMFIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "memfit" / "kernels"


# MEMFIT_CPU_ISA caps the instruction sets memfit's kernel choice sees, so one machine can run the paths an older
# CPU takes (the memory figures and fallbacks of a host it does not have): "avx512" hides AMX (a Zen 4 or Cooper
# Lake class core), "avx2" hides AMX and AVX-512 (an AVX2-only x86). memfit/__init__.py caps oneDNN and ATen to
# match. Unset or "native": the CPU as it is.
ISA_CAPS = {"native": (), "avx512": ("amx",), "avx2": ("amx", "avx512")}  # cap -> flag prefixes hidden


def isa_cap() -> str:
    """MEMFIT_CPU_ISA, checked: "native", "avx512" or "avx2"."""
    cap = os.environ.get("MEMFIT_CPU_ISA", "").strip().lower() or "native"
    if cap not in ISA_CAPS:
        raise ValueError(f"MEMFIT_CPU_ISA={cap!r}: expected one of {', '.join(ISA_CAPS)}")
    return cap


def _read_proc_flags() -> frozenset[str]:
    global _proc_flags
    if _proc_flags is None:
        flags: frozenset[str] = frozenset()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = frozenset(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _proc_flags = flags
    return _proc_flags


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux/x86; read once a process), less those
    MEMFIT_CPU_ISA hides (read on each call)."""
    flags = _read_proc_flags()
    hidden = ISA_CAPS[isa_cap()]
    return frozenset(f for f in flags if not f.startswith(hidden)) if hidden else flags


def amx_allowed() -> bool:
    """Whether memfit may ask the kernel library for AMX tiles (the CPU lists AMX-BF16 and no cap hides it); the
    library's own memfit_amx_available then asks Linux for the tile state."""
    return "amx_bf16" in cpu_flags()


def compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("g++") or shutil.which("c++")


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why the kernel can't run `dtype` here (None: it can). Compiles it on first call."""
    if dtype not in NEEDS:
        return f"no memfit CPU linear kernel for {dtype}"
    missing = [f for f in NEEDS[dtype] if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if load_cpu_linear() is None:
        return _reasons.get(_key_or_none() or "", "the kernel could not be built")
    return None


def get_cpu_linear(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel function for `dtype`, or None (reason logged) when this machine can't run it."""
    reason = unavailable_reason(dtype)
    if reason is not None:
        log.info("memfit CPU linear kernel unavailable for %s: %s", dtype, reason)
        return None
    lib = load_cpu_linear()
    assert lib is not None
    return lib.bf16 if dtype == torch.bfloat16 else lib.f32


def _key_or_none(sources: tuple[Path, ...] | None = None, flags: tuple[str, ...] | None = None) -> str | None:
    """The cache key of `sources` built with `flags` by this compiler (a hash of all three); None without one."""
    sources, flags = (SOURCES + HEADERS, FLAGS) if sources is None else (sources, flags or ())
    # (not in the memo: where CXX or PATH's compiler resolves to, which a process does not expect to change)
    memo = (os.environ.get("CXX"), os.environ.get("PATH"), sources, flags)
    key = _keys.get(memo)
    if key is not None:
        return key
    cxx = compiler()
    if cxx is None:  # not remembered: a compiler installed later is found by the next call
        return None
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    h.update("\0".join((os.path.realpath(cxx), *flags)).encode())
    key = _keys[memo] = h.hexdigest()[:16]
    return key


def load_cpu_linear() -> CpuLinearLib | None:
    """Build (once per cache) and load the kernel library; None when that is impossible here."""
    key = _key_or_none()
    with _lock:
        if key is None:
            _reasons[""] = "no C++ compiler found (set CXX or install g++)"
            log.info("memfit CPU linear kernel unavailable: %s", _reasons[""])
            return None
        if key in _loaded:
            return _loaded[key]
        lib = None
        try:
            if "avx512f" not in cpu_flags():
                raise RuntimeError("the CPU lacks avx512f")
            lib = _open(_build(key))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _reasons[key] = str(exc)
            log.info("memfit CPU linear kernel unavailable: %s", exc)
        _loaded[key] = lib
        return lib


def load_cpu_io() -> ctypes.CDLL | None:
    """Build (once per cache) and load the swap tiers' small library (IO_SOURCES: `memfit_crc32c`,
    `memfit_staged_pwrite`, `memfit_staged_pread`, `memfit_copy_rows`); None without a compiler or SSE4.2, or if the
    build fails."""
    key = _key_or_none(IO_SOURCES + IO_HEADERS, IO_FLAGS)
    with _lock:
        if key is None:
            return None
        name = f"io-{key}"
        if name not in _loaded:
            lib = None
            try:
                if "sse4_2" not in cpu_flags():
                    raise RuntimeError("the CPU lacks sse4_2")
                lib = ctypes.CDLL(str(_build(key, IO_SOURCES, IO_FLAGS, "cpu_io")))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _reasons[name] = str(exc)
                log.info("memfit CPU I/O kernels unavailable: %s", exc)
            _loaded[name] = lib  # type: ignore[assignment]
        return _loaded[name]  # type: ignore[return-value]


def _build(key: str, sources: tuple[Path, ...] | None = None, flags: tuple[str, ...] | None = None,
           stem: str = "cpu_linear") -> Path:
    global compile_count
    sources, flags = (SOURCES, FLAGS) if sources is None else (sources, flags or ())
    out_dir = cache_dir()
    target = out_dir / f"{stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    # Build into a temporary name and rename: another process loading the same key never sees half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, *map(str, sources), "-o", tmp], capture_output=True, text=True, timeout=120)
        compile_count += 1
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(s.name for s in sources)} with {cxx} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        if os.path.getsize(tmp) == 0:
            raise RuntimeError(f"compiling the kernels with {cxx} produced no library")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(path: Path) -> CpuLinearLib:
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    fns = []
    for name in ("memfit_linear_bf16", "memfit_linear_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
        fns.append(fn)
    return CpuLinearLib(path, *fns, lib)


def _forget_loaded() -> None:
    """Tests only: forget what this process loaded and the keys it hashed, so the next call goes through the
    cache again (/proc/cpuinfo's flags are kept: the CPU does not change)."""
    with _lock:
        _loaded.clear()
        _reasons.clear()
        _keys.clear()
