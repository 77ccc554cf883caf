"""HostRegion: one budgeted host mapping that hands out byte buffers by extent and keeps freed pages warm.

Why: the host swap tier (llm/kv/swap.py) used to take a fresh `torch.empty` buffer for every chunk it swapped
out. Past glibc's largest mmap threshold (32 MiB) every such buffer is a fresh mapping, and below it one can be
(the threshold moves with what was freed last, and the engine trims the heap under a budget), so the copy into it
page-faults and zeroes every 4 KiB page on the way. benchmarks/swap_tiers.py --modes stacked region measures it
(swap_tiers_region_zen4.json, Zen 4): a 48 MiB swap-out of the 0.5B shape ran at 0.21 of memcpy into fresh
buffers and 0.82 from the region (3.8x); at 6-24 MiB the two were level, glibc reusing its heap there. A region
of the tier's own keeps the pages it has committed, so a swap-out after the first writes into memory that is
already there: what vLLM gets by allocating its whole CPU swap space up front, paid here only for the pages used.

    region = HostRegion(1 << 30, budget, keep_bytes=None)   # None: keep every freed page (up to the capacity)
    buf = region.take(nbytes)        # (nbytes,) uint8 view, its pages committed; None if no extent fits
    region.free(buf)                 # its extent back; its pages kept (cached) or returned, by keep_bytes
    region.trim()                    # give every cached page back (a budget needs the room, or the engine idles)

Accounting. The caller reserves the `nbytes` it takes in `budget` under its own owner, as it would for any
buffer. The region reserves the rest of what it holds under `owner`: the pages of free extents it keeps
(cached) and each taken extent's rounding to whole pages. So at every moment

    budget.by_owner()[owner] == committed_bytes - taken_bytes

and the region's RSS (what the kernel's page map shows for the range) is the region's committed bytes. A
reservation the budget cannot give makes `take` return None (after trimming the cache), and `free` return the
pages instead of keeping them: the region never holds a byte its budget has not granted.

Memory: an anonymous `MAP_NORESERVE` mapping of `capacity` bytes (a `VirtualArena`: 4 KiB pages, no huge pages),
committed with `MADV_POPULATE_WRITE` extent by extent; free space is an `ExtentMap` (first fit, coalescing),
so the low, warm addresses are reused first. A taken buffer keeps the mapping alive through its storage, but
its extent is reused once freed: the caller frees a buffer only when nothing reads or writes it any more (the
swap tier lets copies in flight land first). CPU only, and only where the page size is the extent size (4 KiB).
"""
from __future__ import annotations

import threading

import torch

from memfit.memory.budget import MemoryBudget
from memfit.memory.extent_map import ALIGN, ExtentMap, extent_bytes
from memfit.memory.vmem import CPU_PAGE_SIZE, VirtualArena

__all__ = ["REGION_OWNER", "HostRegion"]

REGION_OWNER = "host_region"  # the budget owner of the region's own bytes: cached pages, and page rounding


class HostRegion:
    """Byte buffers carved from one committed-on-demand host mapping of `capacity` bytes (see the module doc)."""

    supported = CPU_PAGE_SIZE == ALIGN  # an extent must be whole pages, or freeing one would decommit a neighbour

    def __init__(self, capacity: int, budget: MemoryBudget, keep_bytes: int | None = None,
                 owner: str = REGION_OWNER) -> None:
        if not self.supported:
            raise ValueError(f"HostRegion needs {ALIGN}-byte pages, this system's are {CPU_PAGE_SIZE}")
        if keep_bytes is not None and keep_bytes < 0:
            raise ValueError(f"keep_bytes must be >= 0 or None, got {keep_bytes}")
        self.arena = VirtualArena(extent_bytes(capacity), "cpu")  # the region's own count; the budget is below
        self._flat = self.arena.tensor()  # (size,) uint8: buffers are slices of it (a slice is cheaper than as_strided)
        self.space = ExtentMap(self.arena.size)
        self.budget, self.owner = budget, owner
        self.keep_bytes = self.arena.size if keep_bytes is None else keep_bytes
        self.taken: dict[int, int] = {}  # offset -> bytes asked for, of every buffer out
        self.taken_bytes = 0  # their sum
        self._taken_extents = 0  # the same rounded up to whole extents (pages)
        self._reserved = 0  # what the region holds under `owner` in the budget
        self._lock = threading.Lock()

    @property
    def committed_bytes(self) -> int:
        return self.arena.committed_bytes

    @property
    def cached_bytes(self) -> int:
        """Committed pages no buffer uses (kept for the next take)."""
        return self.arena.committed_bytes - self._taken_extents

    def owns(self, buf: torch.Tensor) -> bool:
        off = buf.data_ptr() - self.arena.address
        return 0 <= off < self.arena.size and off in self.taken

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A (nbytes,) uint8 buffer with its pages committed, or None: no free extent that large, or the budget
        cannot hold the pages it adds beyond the `nbytes` the caller reserved (after the cache was trimmed)."""
        if nbytes <= 0:
            raise ValueError(f"take needs a positive size, got {nbytes}")
        with self._lock:
            off = self.space.alloc(nbytes)
            if off is None:  # fragmented: the caller's reservation fitted, no free extent is that large
                return None
            ext = extent_bytes(nbytes)
            if not self.arena.is_committed(off, ext):  # warm already (the common case): nothing to commit
                try:
                    self.arena.commit(off, ext)  # MADV_POPULATE_WRITE the pages not cached already
                except BaseException:  # (ENOMEM): the extent back, nothing held
                    self.space.free(off, nbytes)
                    self.arena.decommit(off, ext)
                    self._settle()
                    raise
            self.taken[off] = nbytes
            self.taken_bytes += nbytes
            self._taken_extents += ext
            if not self._settle():
                self._trim_locked()
                if not self._settle():  # the page rounding does not fit the budget even so: undo, and say so
                    self._untake(off)
                    self.arena.decommit(off, ext)
                    self._settle()
                    return None
            return self._flat[off : off + nbytes]

    def free(self, buf: torch.Tensor) -> None:
        """Give `buf`'s extent back (the caller has released the `nbytes` it reserved for it). Its pages stay
        committed while the cache is within keep_bytes and the budget grants them, else they are returned."""
        off = buf.data_ptr() - self.arena.address
        with self._lock:
            if off not in self.taken:
                raise ValueError("free of a buffer this region did not hand out (or freed twice)")
            nbytes = self._untake(off)
            if self.cached_bytes > self.keep_bytes or not self._settle():
                self.arena.decommit(off, extent_bytes(nbytes))
                self._settle()

    def trim(self, nbytes: int | None = None) -> int:
        """Return cached pages, the highest first (first fit reuses the low ones), until at least `nbytes` are
        given back (None: every one); the bytes given back."""
        with self._lock:
            return self._trim_locked(nbytes)

    # ---- inside --------------------------------------------------------------------------------------------
    def _untake(self, off: int) -> int:
        nbytes = self.taken.pop(off)
        self.taken_bytes -= nbytes
        self._taken_extents -= extent_bytes(nbytes)
        self.space.free(off, nbytes)
        return nbytes

    def _trim_locked(self, nbytes: int | None = None) -> int:
        before = self.arena.committed_bytes
        if nbytes is None:
            self.arena.decommit_many(self.space.free_extents)  # free extents are whole pages (ALIGN == page)
        elif nbytes > 0:
            left = nbytes
            for off, length in reversed(self.space.free_extents):
                for run_off, run_len in reversed(self.arena.committed_runs(off, length)):
                    lo = max(run_off, off, run_off + run_len - left)  # the run's top `left` bytes (pages)
                    lo -= lo % ALIGN
                    left -= self.arena.decommit(lo, run_off + run_len - lo)
                    if left <= 0:
                        break
                if left <= 0:
                    break
        self._settle()
        return before - self.arena.committed_bytes

    def _settle(self) -> bool:
        """Bring the region's reservation to committed - taken; False (nothing changed) if the increase does not
        fit the budget. A decrease always succeeds."""
        want = self.arena.committed_bytes - self.taken_bytes
        if want > self._reserved:
            if not self.budget.try_reserve(want - self._reserved, self.owner):
                return False
        elif want < self._reserved:
            self.budget.release(self._reserved - want, self.owner)
        self._reserved = want
        return True

    def close(self) -> None:
        """Return every page and reservation; buffers still out read zeros afterwards (do not use them)."""
        with self._lock:
            self.taken.clear()
            self.taken_bytes = self._taken_extents = 0
            self._flat = torch.empty(0, dtype=torch.uint8)  # this view would keep the mapping alive
            self.arena.close()
            if self._reserved:
                self.budget.release(self._reserved, self.owner)
                self._reserved = 0
