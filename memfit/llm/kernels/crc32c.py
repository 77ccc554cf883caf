"""CRC-32C in hardware (cpu_crc32c.cpp), the SSD swap tier's checksum where the CPU has SSE4.2; zlib's CRC-32
elsewhere.

    name, update = checksum()      # ("crc32c", fn) or ("crc32", zlib.crc32)
    crc = update(view, 0); crc = update(more, crc)

Both continue a running value over consecutive buffers (any object with the buffer protocol), and both release
the GIL while they run (a ctypes call; zlib.crc32 on buffers over 5 KiB), so checksums on the swap pool's threads
overlap the model step and each other. The two differ in polynomial, so a tier picks one for its whole life
(its file lives only as long as the process).
"""
from __future__ import annotations

import ctypes
import logging
import zlib
from typing import Callable

import numpy as np

from memfit.llm.kernels.build import cpu_flags, load_cpu_io

log = logging.getLogger(__name__)

Update = Callable[[object, int], int]
_fn: ctypes._CFuncPtr | None = None


def _kernel() -> ctypes._CFuncPtr | None:
    global _fn
    if _fn is None and "sse4_2" in cpu_flags():
        lib = load_cpu_io()  # the SSD tier's small kernel library (None: no compiler, a failed build)
        if lib is not None:
            fn = lib.memfit_crc32c
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32]
            fn.restype = ctypes.c_uint32
            _fn = fn
    return _fn


def crc32c(data: object, crc: int = 0) -> int:
    """CRC-32C of `data` (a buffer), continuing `crc`; RuntimeError where the kernel cannot run here."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the CRC-32C kernel needs SSE4.2 and a C++ compiler (memfit/llm/kernels/build.py: "
                           "load_cpu_io)")
    arr = np.frombuffer(data, dtype=np.uint8)  # type: ignore[call-overload]  # no copy; read-only is fine
    return int(fn(arr.ctypes.data, arr.size, crc & 0xFFFFFFFF)) if arr.size else crc & 0xFFFFFFFF


def checksum(prefer: str = "auto") -> tuple[str, Update]:
    """The checksum a new SSD tier uses: ("crc32c", the kernel) where it runs, else ("crc32", zlib.crc32).
    `prefer="crc32"` forces zlib's (the benchmark's before/after)."""
    if prefer not in ("auto", "crc32c", "crc32"):
        raise ValueError(f"unknown checksum {prefer!r}: auto, crc32c or crc32")
    if prefer != "crc32" and _kernel() is not None:
        return "crc32c", crc32c
    if prefer == "crc32c":
        raise RuntimeError("CRC-32C was asked for but its kernel cannot run here")
    return "crc32", zlib.crc32  # type: ignore[return-value]
