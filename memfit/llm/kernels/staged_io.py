"""The SSD swap tier's O_DIRECT gather-checksum-write and read-checksum-scatter loops in one C call each
(cpu_staged_io.cpp), so a swap thread releases the GIL once per call instead of around every copy and system
call (kv/swap_ssd.py passes them to memory/extent_store.py, which runs the same loop in Python without them).

    io = staged_io()                 # None where the kernels cannot run (then the Python loop is used)
    crc, seconds = io.write(fd, offset, stage, views, align)   # OSError on failure, as os.pwrite raises it
    crc, seconds = io.read(fd, offset, stage, views, align)
    crcs, seconds, io_seconds = io.write_segments(fd, offset, stage, [views0, views1, ...], align)  # several extents
    crcs, seconds, io_seconds = io.read_segments(fd, offset, stage, [views0, views1, ...], align)
    crcs, seconds, io_seconds = io.read_at(fd, [offset0, offset1, ...], stage, [views0, views1, ...], align)
    io.set_depth(1)                  # one whole-stage I/O at a time instead of quarter-stage ones in flight

`stage`: the store's page-aligned staging buffer, (STAGE,) uint8; `views`: the runs, in order, byte memoryviews
or ByteSpans (memory/byte_span.py: an address and a length, for runs named by address, no view made). A segment is one
extent's runs; write_segments lays them out one after another in the file, each from an `align` boundary (the one
before padded with zeros), in I/Os of a quarter of the stage, up to four in flight (depth 4, the default), of
half of it (depth 2), or of the whole stage (depth 1; also at the other depths for a call of at most one piece,
which has nothing to overlap); `read_at` reads extents from anywhere in the file, a piece at a time with one I/O
per stretch contiguous in the file, all submitted at once (Linux AIO), the next pieces' while this one is
scattered. A CRC is CRC-32C (kernels/crc32c.py)
of a segment's data bytes, from 0; `seconds`: the time inside the call (the wait to take the GIL back afterwards
is not in it), `io_seconds` the part of it in the system calls, waits for the disk included (the rest is copies
and checksums, which at depth 2 or 4 run while other pieces' I/Os are in flight).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from memfit.llm.kernels.crc32c import _kernel as _crc_kernel
from memfit.llm.kernels.build import load_cpu_io
from memfit.memory.byte_span import ByteRun, ByteSpan

__all__ = ["AIO_MAX_IOS", "StagedIO", "aio_ring_bytes", "staged_io"]

AIO_MAX_IOS = 256  # staged_aio.hpp's MAX_IOS: the events each thread's AIO context is set up for
_IO_EVENT, _AIO_RING_HEADER = 32, 32  # sizeof(struct io_event), sizeof(struct aio_ring) (linux/aio_abi.h, fs/aio.c)


def _possible_cpus() -> int:
    """num_possible_cpus(), from /sys/devices/system/cpu/possible ("0-15" or "0,2-3"); os.cpu_count() without it."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def aio_ring_bytes(max_ios: int = AIO_MAX_IOS) -> int:
    """The memory of one thread's AIO context: the kernel's completion ring, mapped into the process as
    "/[aio] (deleted)" and held until the thread exits (cpu_staged_io.cpp keeps one context per thread). The
    kernel's sizing (fs/aio.c, ioctx_alloc and aio_setup_ring): at least 4 events per possible CPU, doubled, plus 2,
    32 bytes each after a 32-byte header, in whole pages. 256 events on up to 64 CPUs: 20 KiB. 0 off Linux."""
    if not os.path.exists("/proc/self/maps"):
        return 0
    events = max(max_ios, _possible_cpus() * 4) * 2 + 2
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-(_AIO_RING_HEADER + events * _IO_EVENT) // page) * page

# fd, offset (write: where the first segment goes) or offsets (read: one per segment), stage, stage_size, ptrs, lens,
# seg_runs, nsegs, align, crcs (one per segment), ns[2]
_ARGS = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
_READ_ARGS = [ctypes.c_int, ctypes.c_void_p, *_ARGS[2:]]


@dataclass
class StagedIO:
    _write: ctypes._CFuncPtr
    _read: ctypes._CFuncPtr
    _depth: ctypes._CFuncPtr

    def set_depth(self, depth: int) -> int:
        """Stage pieces in flight at once, process-wide: 4 (the default) cuts the stage in quarters and gathers or
        scatters one while the others' I/Os are in flight, 2 in halves; 1 one whole-stage I/O at a time. Returns
        the previous."""
        if depth not in (1, 2, 4):
            raise ValueError(f"depth must be 1, 2 or 4, got {depth}")
        return int(self._depth(depth))

    @property
    def depth(self) -> int:
        return int(self._depth(-1))

    def write(self, fd: int, offset: int, stage: np.ndarray, views: list[ByteRun], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self._call(self._write, fd, offset, stage, [views], align)
        return crcs[0], seconds

    def read(self, fd: int, offset: int, stage: np.ndarray, views: list[ByteRun], align: int) -> tuple[int, float]:
        crcs, seconds, _ = self.read_at(fd, [offset], stage, [views], align)
        return crcs[0], seconds

    def write_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[ByteRun]],
                       align: int) -> tuple[list[int], float, float]:
        return self._call(self._write, fd, offset, stage, segments, align)

    def read_segments(self, fd: int, offset: int, stage: np.ndarray, segments: list[list[ByteRun]],
                      align: int) -> tuple[list[int], float, float]:
        """Segments laid out one after another from `offset`, as write_segments wrote them."""
        offsets = []
        for seg in segments:
            offsets.append(offset)
            offset += max(align, -(-sum(v.nbytes for v in seg) // align) * align)
        return self.read_at(fd, offsets, stage, segments, align)

    def read_at(self, fd: int, offsets: list[int], stage: np.ndarray, segments: list[list[ByteRun]],
                align: int) -> tuple[list[int], float, float]:
        """Segment i from the extent at offsets[i] (anywhere in the file): a stage's worth at a time, one I/O per
        stretch contiguous in the file, submitted together."""
        where = (ctypes.c_int64 * max(1, len(offsets)))(*offsets)
        return self._call(self._read, fd, where, stage, segments, align)  # type: ignore[arg-type]

    @staticmethod
    def _call(fn: ctypes._CFuncPtr, fd: int, offset: int | ctypes.Array, stage: np.ndarray,
              segments: list[list[ByteRun]],
              align: int) -> tuple[list[int], float, float]:
        runs = [v for seg in segments for v in seg]
        ptrs = (ctypes.c_void_p * max(1, len(runs)))(*[_address(v) for v in runs])
        lens = (ctypes.c_int64 * max(1, len(runs)))(*[v.nbytes for v in runs])
        counts = (ctypes.c_int64 * max(1, len(segments)))(*[len(seg) for seg in segments])
        crcs, ns = (ctypes.c_uint32 * max(1, len(segments)))(), (ctypes.c_int64 * 2)()
        got = fn(fd, offset, stage.ctypes.data, stage.size, ptrs, lens, counts, len(segments), align, crcs, ns)
        if got < 0:
            at = offset if isinstance(offset, int) else list(offset)[:4]
            raise OSError(-got, f"{os.strerror(-got)} (staged O_DIRECT I/O at offset {at})")
        return [int(c) for c in crcs[: len(segments)]], ns[0] / 1e9, ns[1] / 1e9


def _address(run: ByteRun) -> int:
    """Where a run's bytes start: a ByteSpan says so; a view's pointer through numpy (no copy)."""
    if isinstance(run, ByteSpan):
        return run.address
    return np.frombuffer(run, dtype=np.uint8).ctypes.data  # type: ignore[call-overload]


_io: StagedIO | None = None


def staged_io() -> StagedIO | None:
    """The C loops, or None where memfit's kernels (and the CRC-32C instruction) cannot run here."""
    global _io
    if _io is None and _crc_kernel() is not None:
        lib = load_cpu_io()  # SSE4.2 only: no AVX-512 needed (kernels/build.py)
        if lib is not None:
            fns = []
            for name, args in (("memfit_staged_pwrite", _ARGS), ("memfit_staged_pread", _READ_ARGS)):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int64
                fns.append(fn)
            depth = lib.memfit_staged_io_depth
            depth.argtypes, depth.restype = [ctypes.c_int], ctypes.c_int
            _io = StagedIO(*fns, depth)
    return _io
