"""The SSD swap tier's O_DIRECT gather-checksum-write and read-checksum-scatter loops in one C call each
(cpu_staged_io.cpp), so a swap thread releases the GIL once per extent instead of around every copy and system
call (kv/swap_ssd.py passes them to memory/extent_store.py, which runs the same loop in Python without them).

    io = staged_io()                 # None where the kernels cannot run (then the Python loop is used)
    crc, seconds = io.write(fd, offset, stage, views, align)   # OSError on failure, as os.pwrite raises it
    crc, seconds = io.read(fd, offset, stage, views, align)

`stage`: the store's page-aligned staging buffer, (STAGE,) uint8; `views`: the runs, in order. The CRC is
CRC-32C (kernels/crc32c.py), continued from 0 over the data bytes; `seconds`: the time inside the call (the wait to
take the GIL back afterwards is not in it).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from memfit.llm.kernels.crc32c import _kernel as _crc_kernel
from memfit.llm.kernels.build import load_cpu_linear

__all__ = ["StagedIO", "staged_io"]

_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int64)]


@dataclass
class StagedIO:
    _write: ctypes._CFuncPtr
    _read: ctypes._CFuncPtr

    def write(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        return self._call(self._write, fd, offset, stage, views, align)

    def read(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        return self._call(self._read, fd, offset, stage, views, align)

    @staticmethod
    def _call(fn: ctypes._CFuncPtr, fd: int, offset: int, stage: np.ndarray, views: list[memoryview],
              align: int) -> tuple[int, float]:
        arrays = [np.frombuffer(v, dtype=np.uint8) for v in views]  # type: ignore[call-overload]  # no copies
        ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        lens = (ctypes.c_int64 * max(1, len(arrays)))(*[a.size for a in arrays])
        crc, ns = ctypes.c_uint32(0), ctypes.c_int64(0)
        got = fn(fd, offset, stage.ctypes.data, stage.size, ptrs, lens, len(arrays), align, ctypes.byref(crc),
                 ctypes.byref(ns))
        if got < 0:
            raise OSError(-got, f"{os.strerror(-got)} (staged O_DIRECT I/O at offset {offset})")
        return int(crc.value), ns.value / 1e9


_io: StagedIO | None = None


def staged_io() -> StagedIO | None:
    """The C loops, or None where memfit's kernels (and the CRC-32C instruction) cannot run here."""
    global _io
    if _io is None and _crc_kernel() is not None:
        lib = load_cpu_linear()
        if lib is not None:
            fns = []
            for name in ("memfit_staged_pwrite", "memfit_staged_pread"):
                fn = getattr(lib.cdll, name)
                fn.argtypes, fn.restype = _ARGS, ctypes.c_int64
                fns.append(fn)
            _io = StagedIO(*fns)
    return _io
