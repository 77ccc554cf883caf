"""The SSD swap tier, below the host tier: chunks of swapped KV demoted there when the host tier is full.

    ssd = SSDTier("/nvme/memfit", 64 << 30)                  # one preallocated file (memory/extent_store.py)
    swap = SwapSpace(kv, host_budget, ssd=ssd)               # kv/swap.py demotes to it under host pressure

`write_chunks` writes host chunks (one positioned write each: a chunk is a whole run of a sequence's KV) and
returns their extents, or None with nothing kept when the tier cannot take them all: its budget is full, or a
write failed (the error is counted and logged; the caller keeps the chunk on the host or recomputes, so no
request is lost). Each extent carries a checksum of its bytes: CRC-32C in hardware where the CPU has it
(kernels/crc32c.py, ~9 GB/s of CPU time here), else zlib's CRC-32 (~2 GB/s, slower than the disk: it was the
tier's largest cost). It is computed piece by piece as the bytes pass through the store's staging buffer, while
they are in the CPU's caches, not in a second pass over the KV memory. With CRC-32C and O_DIRECT the whole loop
(gather, checksum, pwrite; or pread, checksum, scatter) is one C call (kernels/staged_io.py) that releases the
GIL once per extent: the Python loop gave it up and waited to take it back around every copy and system call,
and beside the engine thread a 144 KiB extent took 6-8 ms instead of 0.2-0.3 ms. `reader(extent)` is the swap-in: it reads
the extent into the sequence's KV runs (with O_DIRECT through the store's page-aligned staging buffer, else a
scatter read straight into them; memory/extent_store.py) and checks the checksum over what was read; a failed
read or a mismatch raises SwapLost, and the scheduler recomputes the sequence, so corrupt KV is never served.
Readers run on the swap thread pool; counters take a lock.

The tier's budget (`Tier.SSD`, owner "swap") is the file's size; it is a ledger of its own, not a share of
the memory budget, since disk is not memory.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from memfit.llm.kernels.crc32c import checksum
from memfit.llm.kernels.staged_io import staged_io
from memfit.llm.kv.swap_model import OWNER, SwapLost, SwapStats
from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.extent_store import ALIGN, ExtentStore
from memfit.memory.mapping import round_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extent:
    offset: int
    nbytes: int
    crc: int  # the tier's checksum (CRC-32C or CRC-32) of the nbytes written


class SSDTier:
    def __init__(self, directory: str | Path, capacity: int, direct: bool = True, checksum_kind: str = "auto",
                 staged: bool = True, threads: int = 0, prewrite: bool = False) -> None:
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

    def write_chunks(self, bufs: list[torch.Tensor]) -> list[Extent] | None:
        """Write each host buffer (uint8) to an extent of its own; all or nothing."""
        extents: list[Extent] = []
        for buf in bufs:
            extent = self.write_runs([buf])
            if extent is None:
                return self._undo(extents)
            extents.append(extent)
        return extents

    def write_runs(self, runs: list[torch.Tensor]) -> Extent | None:
        """Write uint8 runs, in order, to one extent (straight from the KV cache's memory on the CPU: no host
        buffer of the tier's own); None, with nothing kept, if the tier is full or the write fails."""
        self.write_failed = False
        n = sum(r.numel() for r in runs)
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
        if not self.budget.try_reserve(round_up(nbytes, ALIGN), OWNER):
            return None
        off = self.store.alloc(nbytes)
        if off is None:  # fragmented: the budget had room, no single extent does
            self.budget.release(round_up(nbytes, ALIGN), OWNER)
        return off

    def unplace(self, offset: int, nbytes: int) -> None:
        """Give back an extent whose write failed (on the engine thread)."""
        self.store.free(offset, nbytes)
        self.budget.release(round_up(nbytes, ALIGN), OWNER)

    def write_at(self, offset: int, runs: list[torch.Tensor]) -> Extent:
        """Write uint8 runs, in order, to the extent `place` gave (on any thread: a swap-out on the pool), with
        their CRC; an OSError is counted, logged and raised (the caller unplaces the extent)."""
        t0 = time.perf_counter()
        n = sum(r.numel() for r in runs)
        views = [memoryview((r if r.device.type == "cpu" else r.cpu()).numpy()) for r in runs]
        crc, update = [0], self._update

        def digest(piece: memoryview) -> None:
            crc[0] = update(piece, crc[0])

        def staged(fd: int, off: int, stage: np.ndarray, vs: list[memoryview]) -> None:
            crc[0] = self._io.write(fd, off, stage, vs, ALIGN)[0]  # type: ignore[union-attr]

        try:
            self.store.write(offset, views, digest, staged if self._io is not None else None)
        except OSError as exc:
            self._count_error()
            log.warning("SSD swap write of %d bytes failed (%s): kept on the host or recomputed", n, exc)
            raise
        with self._lock:
            self.stats.account(n, 1, time.perf_counter() - t0, out=True)
            self.stats.resident_bytes += n
        return Extent(offset, n, crc[0])

    def reader(self, extent: Extent) -> Callable[[list[torch.Tensor]], None]:
        """A function that fills the given uint8 runs (in order, `extent.nbytes` in all) from the extent, checked."""
        def read(runs: list[torch.Tensor]) -> None:
            t0 = time.perf_counter()
            if sum(r.numel() for r in runs) != extent.nbytes:
                raise SwapLost(f"an SSD extent of {extent.nbytes} bytes does not match its runs")
            on_cpu = all(r.device.type == "cpu" for r in runs)
            bounce = None if on_cpu else torch.empty(extent.nbytes, dtype=torch.uint8, pin_memory=True)
            views = [memoryview(r.numpy()) for r in runs] if on_cpu else [memoryview(bounce.numpy())]  # type: ignore[union-attr]
            crc, update = [0], self._update

            def digest(piece: memoryview) -> None:
                crc[0] = update(piece, crc[0])

            def staged(fd: int, off: int, stage: np.ndarray, vs: list[memoryview]) -> None:
                crc[0] = self._io.read(fd, off, stage, vs, ALIGN)[0]  # type: ignore[union-attr]

            try:
                self.store.readinto(extent.offset, views, digest, staged if self._io is not None else None)
            except OSError as exc:
                self._count_error()
                raise SwapLost(f"SSD swap read failed: {exc}") from exc
            if crc[0] != extent.crc:
                self._count_error()
                raise SwapLost(f"SSD swap extent at {extent.offset} failed its checksum: recomputed, not served")
            if bounce is not None:
                off = 0
                for r in runs:
                    r.copy_(bounce[off : off + r.numel()])
                    off += r.numel()
            with self._lock:
                self.stats.account(extent.nbytes, 1, time.perf_counter() - t0, out=False)
        return read

    def free(self, extent: Extent) -> None:
        self.store.free(extent.offset, extent.nbytes)
        self.budget.release(round_up(extent.nbytes, ALIGN), OWNER)
        with self._lock:
            self.stats.resident_bytes -= extent.nbytes

    def close(self) -> None:
        self.store.close()

    def _undo(self, extents: list[Extent]) -> None:
        for e in extents:
            self.store.free(e.offset, e.nbytes)
            self.budget.release(round_up(e.nbytes, ALIGN), OWNER)
        return None

    def _count_error(self) -> None:
        with self._lock:
            self.stats.io_errors += 1
