"""The SSD swap tier, below the host tier: chunks of swapped KV demoted there when the host tier is full.

    ssd = SSDTier("/nvme/memfit", 64 << 30)                  # one preallocated file (memory/extent_store.py)
    swap = SwapSpace(kv, host_budget, ssd=ssd)               # kv/swap.py demotes to it under host pressure

`write_chunks` writes host chunks (a sequence's demoted chunks: an extent each, placed one after another and written
in one pass) and returns their extents, or None with nothing kept when the tier cannot take them all: its budget is
full, or a write failed (the error is counted and logged; the caller keeps the chunk on the host or recomputes, so
no request is lost). Why in one pass: with reuse a sequence's copy is several chunks of ~100-150 KB, and an O_DIRECT
I/O that small reaches about half the disk's bandwidth here (1.2-1.7 GB/s against 2.6-3.3 at 4 MiB), one of 1 MiB
(the staging buffer) 0.9 of it; the per-call costs (a GIL hand-over on a swap thread) shrink the same way. Each
extent carries a checksum of its bytes: CRC-32C in hardware where the CPU has it (kernels/crc32c.py, ~9 GB/s of CPU
time here), else zlib's CRC-32 (~2 GB/s, slower than the disk: it was the tier's largest cost). It is computed piece
by piece as the bytes pass through the store's staging buffer, while they are in the CPU's caches, not in a second
pass over the KV memory. With CRC-32C and O_DIRECT the whole loop (gather, checksum, pwrite; or pread, checksum,
scatter) is one C call (kernels/staged_io.py) that releases the GIL once per call: the Python loop gave it up and
waited to take it back around every copy and system call, and beside the engine thread a 144 KiB extent took 6-8 ms
instead of 0.2-0.3 ms. `reader(extents)` is the swap-in: it reads a sequence's consecutive SSD chunks, wherever they
lie, in one call into its KV runs (with O_DIRECT through the store's page-aligned staging buffer, a piece of it at
a time with the next pieces' reads in flight: one I/O per stretch contiguous in the file, a piece's submitted
together with Linux AIO, so the thread sleeps and waits to be woken once a piece, not once per extent; else a scatter read straight into them; memory/extent_store.py) and
checks each extent's checksum over what was read; a failed read or a mismatch raises SwapLost, and the scheduler
recomputes the sequence, so corrupt KV is never served. Readers run on the swap thread pool; counters take a lock.

The tier's budget (`Tier.SSD`, owner "swap") is the file's size; it is a ledger of its own, not a share of
the memory budget, since disk is not memory.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from memfit.llm.kernels.crc32c import checksum
from memfit.llm.kernels.staged_io import staged_io
from memfit.llm.kv.swap_model import OWNER, SwapLost, SwapStats
from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.byte_span import ByteRun, ByteSpan
from memfit.memory.extent_store import ALIGN, ExtentStore, Staged, extent_bytes, segment_offsets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extent:
    offset: int
    nbytes: int
    crc: int  # the tier's checksum (CRC-32C or CRC-32) of the nbytes written


class SSDTier:
    def __init__(self, directory: str | Path, capacity: int, direct: bool = True, checksum_kind: str = "auto",
                 staged: bool = True, threads: int = 0, prewrite: bool = False, batch: bool = True) -> None:
        # O_DIRECT where the file system allows, through at most threads + 1 staging buffers (the engine thread
        # and each swap thread; engine/ledger.py reserves them)
        # (prewrite: zeros over the file at start, so no swap pays ext4's first write into an unwritten extent)
        self.store = ExtentStore(directory, capacity, direct=direct, max_stages=threads + 1, prewrite=prewrite)
        self.checksum, self._update = checksum(checksum_kind)  # "crc32c" (hardware) or "crc32" (zlib)
        # The O_DIRECT loop in C, one GIL release per extent (kernels/staged_io.py); it checksums with CRC-32C
        self._io = staged_io() if self.checksum == "crc32c" and staged else None
        self.budget = MemoryBudget(self.store.capacity, Tier.SSD, name="swap_ssd")
        self.stats = SwapStats()
        self._lock = threading.Lock()
        self.write_failed = False  # the last write_chunks failed on an I/O error (not for want of room)
        # batch: a sequence's chunks demoted together go in one pass, and are read back in one (False: an I/O
        # per chunk, as before; benchmarks/preemption.py compares the two)
        self.batch = batch
        self.syscall_seconds = 0.0  # of the C loop's time, that in pread/pwrite (the rest: copies and checksums)
        # a swap names a CPU cache's KV runs, and the C loop takes tensors' memory, by address (SwapRuns.addresses,
        # ByteSpan) (False: as before, a torch view a run and a memoryview and numpy array of each for its pointer;
        # benchmarks/swap_tiers.py and preemption.py compare the two)
        self.by_address = True

    def write_chunks(self, bufs: list[torch.Tensor | list[Run]]) -> list[Extent] | None:
        """Write each host buffer (uint8), or each list of runs (a chunk's valid part: swap_reuse.py), to an extent of
        its own; all or nothing. The extents are placed one after another and written in one pass (O_DIRECT writes
        of staging pieces across their boundaries: a sequence's chunks demoted together are a few large I/Os, not
        one small I/O each), so a swap-in reads them back in one (`reader`); where no free stretch holds them all,
        each goes where it fits."""
        segments = [b if isinstance(b, list) else [b] for b in bufs]
        if self.batch and len(segments) > 1:
            self.write_failed = False
            total = sum(extent_bytes(sum(_nbytes(r) for r in seg)) for seg in segments)
            off = self.place(total)
            if off is not None:
                try:
                    return self.write_segments_at(off, segments)
                except OSError:
                    self.write_failed = True
                    self.unplace(off, total)
                    return None
        extents: list[Extent] = []
        for seg in segments:
            extent = self.write_runs(seg)
            if extent is None:
                return self._undo(extents)
            extents.append(extent)
        return extents

    def write_runs(self, runs: list[Run]) -> Extent | None:
        """Write uint8 runs (tensors, or ByteSpans: SwapRuns.addresses), in order, to one extent (straight from the
        KV cache's memory on the CPU: no host buffer of the tier's own); None, with nothing kept, if the tier is
        full or the write fails."""
        self.write_failed = False
        n = sum(_nbytes(r) for r in runs)
        off = self.place(n)
        if off is None:
            return None
        try:
            return self.write_at(off, runs)
        except OSError:
            self.write_failed = True
            self.unplace(off, n)
            return None

    def place(self, nbytes: int) -> int | None:
        """Reserve and allocate an extent for `nbytes` (on the engine thread: the allocator and the budget live
        there); None if the tier is full or too fragmented."""
        if not self.budget.try_reserve(extent_bytes(nbytes), OWNER):
            return None
        off = self.store.alloc(nbytes)
        if off is None:  # fragmented: the budget had room, no single extent does
            self.budget.release(extent_bytes(nbytes), OWNER)
        return off

    def unplace(self, offset: int, nbytes: int) -> None:
        """Give back an extent whose write failed (on the engine thread)."""
        self.store.free(offset, nbytes)
        self.budget.release(extent_bytes(nbytes), OWNER)

    def write_at(self, offset: int, runs: list[Run]) -> Extent:
        """Write uint8 runs, in order, to the extent `place` gave (on any thread: a swap-out on the pool), with
        their CRC; an OSError is counted, logged and raised (the caller unplaces the extent)."""
        return self.write_segments_at(offset, [runs])[0]

    def write_segments_at(self, offset: int, segments: list[list[Run]]) -> list[Extent]:
        """Write each segment's uint8 runs, in order, to extents laid out from `offset` (segment_offsets: `place`
        gave their sum of extent_bytes), in one pass, each with its CRC; one I/O op in the tier's counters."""
        t0 = time.perf_counter()
        sizes = [sum(_nbytes(r) for r in runs) for runs in segments]
        views = [[_byte_run(r, self.by_address) for r in runs] for runs in segments]
        crcs = [0] * len(segments)
        try:
            self.store.write_segments(offset, views, self._digests(crcs), self._staged(crcs, write=True))
        except OSError as exc:
            self._count_error()
            log.warning("SSD swap write of %d bytes failed (%s): kept on the host or recomputed", sum(sizes), exc)
            raise
        with self._lock:
            self.stats.account(sum(sizes), 1, time.perf_counter() - t0, out=True)
            self.stats.resident_bytes += sum(sizes)
        return [Extent(off, n, crc) for off, n, crc in zip(segment_offsets(offset, sizes), sizes, crcs)]

    def reader(self, extent: Extent | list[Extent]) -> Callable[[list[Run]], None]:
        """A function that fills the given uint8 runs (tensors or ByteSpans; in order: the first extent's bytes, then the next one's...)
        from the extents, wherever they lie, in one call (one I/O per stretch contiguous in the file, a staging
        buffer's worth submitted at once), each checked by its CRC."""
        extents = [extent] if isinstance(extent, Extent) else list(extent)
        total = sum(e.nbytes for e in extents)

        def read(runs: list[Run]) -> None:
            t0 = time.perf_counter()
            if sum(_nbytes(r) for r in runs) != total:
                raise SwapLost(f"SSD extents of {total} bytes do not match their runs")
            on_cpu = all(isinstance(r, ByteSpan) or r.device.type == "cpu" for r in runs)
            bounce = None if on_cpu else torch.empty(total, dtype=torch.uint8, pin_memory=True)
            views = [_byte_run(r, self.by_address) for r in runs] if on_cpu else [memoryview(bounce.numpy())]  # type: ignore[union-attr]
            segments = _split(views, [e.nbytes for e in extents])
            crcs = [0] * len(extents)
            try:
                self.store.readinto_segments([e.offset for e in extents], segments, self._digests(crcs),
                                             self._staged(crcs, write=False))
            except OSError as exc:
                self._count_error()
                raise SwapLost(f"SSD swap read failed: {exc}") from exc
            for e, crc in zip(extents, crcs):
                if crc != e.crc:
                    self._count_error()
                    raise SwapLost(f"SSD swap extent at {e.offset} failed its checksum: recomputed, not served")
            if bounce is not None:  # (device runs: tensors)
                off = 0
                for r in runs:
                    r.copy_(bounce[off : off + r.numel()])  # type: ignore[union-attr]
                    off += r.numel()
            with self._lock:
                self.stats.account(total, 1, time.perf_counter() - t0, out=False)
        return read

    def _digests(self, crcs: list[int]) -> list[Callable[[memoryview], None]]:
        """Per segment, a digest continuing crcs[i] (the store's Python loop calls them)."""
        update = self._update

        def digest(i: int) -> Callable[[memoryview], None]:
            def step(piece: memoryview) -> None:
                crcs[i] = update(piece, crcs[i])
            return step
        return [digest(i) for i in range(len(crcs))]

    def _staged(self, crcs: list[int], write: bool) -> Staged | None:
        """The C loop over all segments (it fills `crcs` itself), or None where it cannot run."""
        if self._io is None:
            return None
        io = self._io

        def staged(fd: int, offs: list[int], stage: np.ndarray, segs: list[list[ByteRun]]) -> None:
            if write:  # laid out one after another from the first (write_segments_at)
                crcs[:], _, io_seconds = io.write_segments(fd, offs[0], stage, segs, ALIGN)
            else:
                crcs[:], _, io_seconds = io.read_at(fd, offs, stage, segs, ALIGN)
            with self._lock:
                self.syscall_seconds += io_seconds
        return staged

    def free(self, extent: Extent) -> None:
        self.store.free(extent.offset, extent.nbytes)
        self.budget.release(extent_bytes(extent.nbytes), OWNER)
        with self._lock:
            self.stats.resident_bytes -= extent.nbytes

    def close(self) -> None:
        self.store.close()

    def _undo(self, extents: list[Extent]) -> None:
        for e in extents:  # written, counted resident, then given back: all or nothing
            self.free(e)
        return None

    def _count_error(self) -> None:
        with self._lock:
            self.stats.io_errors += 1


Run = Union[torch.Tensor, ByteSpan]  # a uint8 run of KV: a tensor, or its bytes by address (SwapRuns.addresses)


def _nbytes(run: Run) -> int:
    return run.nbytes if isinstance(run, ByteSpan) else run.numel()


def _byte_run(run: Run, by_address: bool = True) -> ByteRun:
    """What the store's I/O takes for a run: by address where it can (a ByteSpan, or a contiguous CPU tensor's
    pointer and length: no view to make), else a view of the run (moved to the CPU first; by_address=False: always,
    as before runs went by address)."""
    if isinstance(run, ByteSpan):
        return run
    if by_address and run.device.type == "cpu" and run.is_contiguous():
        return ByteSpan(run.data_ptr(), run.numel())  # (the caller holds `run` until the I/O returns)
    return memoryview((run if run.device.type == "cpu" else run.cpu()).numpy())


def _cut(run: ByteRun, lo: int, hi: int) -> ByteRun:
    return ByteSpan(run.address + lo, hi - lo) if isinstance(run, ByteSpan) else run[lo:hi]


def _split(runs: list[ByteRun], sizes: list[int]) -> list[list[ByteRun]]:
    """`runs` (uint8, in order) cut into consecutive groups of `sizes` bytes each, a run cut where a group ends."""
    queue = [r if isinstance(r, ByteSpan) else r.cast("B") for r in runs]
    if len(sizes) == 1:  # one extent (the caller checked the total): no cuts
        return [queue]
    segments: list[list[ByteRun]] = []
    for n in sizes:
        seg: list[ByteRun] = []
        while n:
            r = queue.pop(0)
            seg.append(_cut(r, 0, min(n, r.nbytes)))
            if r.nbytes > n:
                queue.insert(0, _cut(r, n, r.nbytes))
            n -= seg[-1].nbytes
        segments.append(seg)
    return segments
