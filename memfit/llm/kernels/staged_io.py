"""The SSD swap tier's O_DIRECT gather-checksum-write and read-checksum-scatter loops in one C call each
(cpu_staged_io.cpp), so a swap thread releases the GIL once per call instead of around every copy and system
call (kv/swap_ssd.py passes them to memory/extent_store.py, which runs the same loop in Python without them).

    io = staged_io()                 # None where the kernels cannot run (then the Python loop is used)
    crc, seconds = io.write(fd, offset, stage, views, align)   # OSError on failure, as os.pwrite raises it
    crc, seconds = io.read(fd, offset, stage, views, align)
    crcs, seconds, io_seconds = io.write_segments(fd, offset, stage, [views0, views1, ...], align)  # several extents
    crcs, seconds, io_seconds = io.read_segments(fd, offset, stage, [views0, views1, ...], align)
    crcs, seconds, io_seconds = io.read_at(fd, [offset0, offset1, ...], stage, [views0, views1, ...], align)

`stage`: the store's page-aligned staging buffer, (STAGE,) uint8; `views`: the runs, in order. A segment is one
extent's runs; write_segments lays them out one after another in the file, each from an `align` boundary (the one
before padded with zeros), in `stage.size`-byte I/Os; `read_at` reads extents from anywhere in the file, a stage's
worth at a time with one I/O per stretch contiguous in the file, all submitted at once (Linux AIO) and waited for
together. A CRC is CRC-32C (kernels/crc32c.py) of a segment's data bytes, from 0; `seconds`: the time inside the
call (the wait to take the GIL back afterwards is not in it), `io_seconds` the part of it in the system calls (the
rest is copies and checksums).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from memfit.llm.kernels.crc32c import _kernel as _crc_kernel
from memfit.llm.kernels.build import load_cpu_linear

__all__ = ["StagedIO", "staged_io"]

# fd, offset (write: where the first segment goes) or offsets (read: one per segment), stage, stage_size, ptrs, lens,
# seg_runs, nsegs, align, crcs (one per segment), ns[2]
_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
_READ_ARGS = [ctypes.c_int, ctypes.c_void_p, *_ARGS[2:]]


@dataclass
class StagedIO:
    _write: ctypes._CFuncPtr
    _read: ctypes._CFuncPtr

    def write(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self._call(self._write, fd, offset, stage, [views], align)
        return crcs[0], seconds

    def read(self, fd: int, offset: int, stage: np.ndarray, views: list[memoryview], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self.read_at(fd, [offset], stage, [views], align)
        return crcs[0], seconds

    def write_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[memoryview]],
                       align: int) -> tuple[list[int], float, float]:
        return self._call(self._write, fd, offset, stage, segments, align)

    def read_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[memoryview]],
                      align: int) -> tuple[list[int], float, float]:
        """Segments laid out one after another from `offset`, as write_segments wrote them."""
        offsets = []
        for seg in segments:
            offsets.append(offset)
            offset += max(align, -(-sum(len(v) for v in seg) // align) * align)
        return self.read_at(fd, offsets, stage, segments, align)

    def read_at(self, fd: int, offsets: list[int], stage: np.ndarray, segments: list[list[memoryview]],
                align: int) -> tuple[list[int], float, float]:
        """Segment i from the extent at offsets[i] (anywhere in the file): a stage's worth at a time, one I/O per
        stretch contiguous in the file, submitted together."""
        where = (ctypes.c_int64 * max(1, len(offsets)))(*offsets)
        return self._call(self._read, fd, where, stage, segments, align)  # type: ignore[arg-type]

    @staticmethod
    def _call(fn: ctypes._CFuncPtr, fd: int, offset: int | ctypes.Array, stage: np.ndarray,
              segments: list[list[memoryview]],
              align: int) -> tuple[list[int], float, float]:
        views = [v for seg in segments for v in seg]
        arrays = [np.frombuffer(v, dtype=np.uint8) for v in views]  # type: ignore[call-overload]  # no copies
        ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        lens = (ctypes.c_int64 * max(1, len(arrays)))(*[a.size for a in arrays])
        counts = (ctypes.c_int64 * max(1, len(segments)))(*[len(seg) for seg in segments])
        crcs, ns = (ctypes.c_uint32 * max(1, len(segments)))(), (ctypes.c_int64 * 2)()
        got = fn(fd, offset, stage.ctypes.data, stage.size, ptrs, lens, counts, len(segments), align, crcs, ns)
        if got < 0:
            at = offset if isinstance(offset, int) else list(offset)[:4]
            raise OSError(-got, f"{os.strerror(-got)} (staged O_DIRECT I/O at offset {at})")
        return [int(c) for c in crcs[: len(segments)]], ns[0] / 1e9, ns[1] / 1e9


_io: StagedIO | None = None


def staged_io() -> StagedIO | None:
    """The C loops, or None where memfit's kernels (and the CRC-32C instruction) cannot run here."""
    global _io
    if _io is None and _crc_kernel() is not None:
        lib = load_cpu_linear()
        if lib is not None:
            fns = []
            for name, args in (("memfit_staged_pwrite", _ARGS), ("memfit_staged_pread", _READ_ARGS)):
                fn = getattr(lib.cdll, name)
                fn.argtypes, fn.restype = args, ctypes.c_int64
                fns.append(fn)
            _io = StagedIO(*fns)
    return _io
