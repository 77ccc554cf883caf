"""The SSD swap tier's O_DIRECT gather-checksum-write and read-checksum-scatter loops in one C call each
(cpu_staged_io.cpp), so a swap thread releases the GIL once per call instead of around every copy and system
call (kv/swap_ssd.py passes them to memory/extent_store.py, which runs the same loop in Python without them).

    io = staged_io()                 # None where the kernels cannot run (then the Python loop is used)
    crc, seconds = io.write(fd, offset, stage, views, align)   # OSError on failure, as os.pwrite raises it
    crc, seconds = io.read(fd, offset, stage, views, align)
    crcs, seconds, io_seconds = io.write_segments(fd, offset, stage, [views0, views1, ...], align)  # several extents
    crcs, seconds, io_seconds = io.read_segments(fd, offset, stage, [views0, views1, ...], align)

`stage`: the store's page-aligned staging buffer, (STAGE,) uint8; `views`: the runs, in order. A segment is one
extent's runs; the segments lie one after another in the file, each from an `align` boundary (the one before padded
with zeros), and move in `stage.size`-byte I/Os. A CRC is CRC-32C (kernels/crc32c.py) of a segment's data bytes,
from 0; `seconds`: the time inside the call (the wait to take the GIL back afterwards is not in it), `io_seconds`
the part of it in the system calls (the rest is copies and checksums).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from memfit.llm.kernels.crc32c import _kernel as _crc_kernel
from memfit.llm.kernels.build import load_cpu_linear

__all__ = ["StagedIO", "staged_io"]

# fd, offset, stage, stage_size, ptrs, lens, seg_runs, nsegs, align, crcs (one per segment), ns[2]
_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]


@dataclass
class StagedIO:
    _write: ctypes._CFuncPtr
    _read: ctypes._CFuncPtr

    def write(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self._call(self._write, fd, offset, stage, [views], align)
        return crcs[0], seconds

    def read(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self._call(self._read, fd, offset, stage, [views], align)
        return crcs[0], seconds

    def write_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[memoryview]],
                       align: int) -> tuple[list[int], float, float]:
        return self._call(self._write, fd, offset, stage, segments, align)

    def read_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[memoryview]],
                      align: int) -> tuple[list[int], float, float]:
        return self._call(self._read, fd, offset, stage, segments, align)

    @staticmethod
    def _call(fn: ctypes._CFuncPtr, fd: int, offset: int, stage: np.ndarray, segments: list[list[memoryview]],
              align: int) -> tuple[list[int], float, float]:
        views = [v for seg in segments for v in seg]
        arrays = [np.frombuffer(v, dtype=np.uint8) for v in views]  # type: ignore[call-overload]  # no copies
        ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        lens = (ctypes.c_int64 * max(1, len(arrays)))(*[a.size for a in arrays])
        counts = (ctypes.c_int64 * max(1, len(segments)))(*[len(seg) for seg in segments])
        crcs, ns = (ctypes.c_uint32 * max(1, len(segments)))(), (ctypes.c_int64 * 2)()
        got = fn(fd, offset, stage.ctypes.data, stage.size, ptrs, lens, counts, len(segments), align, crcs, ns)
        if got < 0:
            raise OSError(-got, f"{os.strerror(-got)} (staged O_DIRECT I/O at offset {offset})")
        return [int(c) for c in crcs[: len(segments)]], ns[0] / 1e9, ns[1] / 1e9


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
