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
    region.try_reserve(nbytes, "swap")   # the caller's bytes: free room, or warm pages' reservation moved to it
    buf = region.take(nbytes)        # (nbytes,) uint8 view, its pages committed; None if no extent fits
    region.free(buf)                 # (after the caller released its nbytes) its extent back; pages kept or returned
    region.trim()                    # give every cached page back (a budget needs the room, or the engine idles)

Accounting. The caller reserves the `nbytes` it takes in `budget` under its own owner, as it would for any
buffer. The region reserves the rest of what it holds under `owner`: its tables (`meta_bytes`: the page bitmap and
the extent lists, reserved at construction for the most extents it will hold, `max_extents`), the pages of free
extents it keeps (cached) and each taken extent's rounding to whole pages. So at every moment

    budget.by_owner()[owner] == meta_bytes + committed_bytes - taken_bytes - lent_bytes

and the region's RSS (what the kernel's page map shows for the range) is the region's committed bytes.
`lent_bytes`: at the tier's high-water mark its warm pages hold the room a new chunk needs, so a reservation
through `try_reserve` moves the shortfall's reservation from the region's owner to the caller's
(`MemoryBudget.transfer`: no other owner can take it in between) instead of returning the pages and faulting
them in again for the chunk; the next `take` carves the chunk from those pages (first fit: the low warm ones)
and the loan is settled. A take that returns None (the caller's buffer will be its own) returns the lent pages,
and `unreserve` moves the reservation back where no take followed. A reservation the budget cannot give makes
`take` return None (after trimming the cache), and `free` return the pages instead of keeping them: the region
never holds a byte its budget has not granted (a take reserves its cold pages before committing them).

Memory: an anonymous `MAP_NORESERVE` mapping of `capacity` bytes (a `VirtualArena`: 4 KiB pages, no huge pages),
committed with `MADV_POPULATE_WRITE` extent by extent; free space is an `ExtentMap` (first fit, coalescing),
so the low, warm addresses are reused first. A taken buffer keeps the mapping alive through its storage, but
its extent is reused once freed: the caller frees a buffer only when nothing reads or writes it any more (the
swap tier lets copies in flight land first). CPU only, and only where the page size is the extent size (4 KiB).
"""
from __future__ import annotations

import bisect
import struct
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from memfit.memory.budget import MemoryBudget, format_bytes
from memfit.memory.extent_map import ALIGN, ExtentMap, extent_bytes
from memfit.memory.mapping import round_up
from memfit.memory.vmem import CPU_PAGE_SIZE, VirtualArena

__all__ = ["EXTENT_SPAN", "MIN_EXTENTS", "REGION_OWNER", "HostRegion", "budget_for", "max_extents_for", "table_bytes"]

REGION_OWNER = "host_region"  # the budget owner of the region's own bytes: tables, cached pages, page rounding
# The region holds at most one buffer per EXTENT_SPAN of its capacity (at least MIN_EXTENTS), so its tables have a
# bound it reserves up front: ~1.6 MiB for a 4 GiB tier (1 MiB of it the page bitmap). A take past the bound returns
# None and the caller's chunk gets a buffer of its own (what a fragmented region does): chunks of the 0.5B shape are
# 12 KiB a token, so the tier's capacity is filled by chunks long before 4096 of them are held in 4 GiB.
EXTENT_SPAN = 1 << 20
MIN_EXTENTS = 16
# Warming ahead (`prefault`, `warm_ahead`) commits at most this many bytes per hold of the region's lock, so a take
# that arrives meanwhile waits for one step's page faults at most (~0.5 ms a MiB on the Zen 4 host), not all of them.
PREFAULT_STEP = 1 << 20
_PTR = struct.calcsize("P")


def max_extents_for(capacity: int) -> int:
    """How many buffers a region of `capacity` bytes holds at most (its tables are reserved for that many)."""
    return max(MIN_EXTENTS, capacity // EXTENT_SPAN)


def table_bytes(capacity: int, max_extents: int | None = None) -> int:
    """The most a region of `capacity` bytes keeps in its tables, reserved in its budget at construction: the page
    bitmap (one bool a page, as a numpy array, its header included) and four lists of ints (the free extents' starts
    and lengths, the taken buffers' offsets and sizes), each at most max_extents + 1 long (coalescing leaves a taken
    buffer between any two free extents), with CPython's over-allocation of a growing list (~1/8 + 6 slots) and
    every entry its own int object of the largest size an offset takes."""
    size = round_up(max(capacity, 1), ALIGN)
    n = (max_extents_for(capacity) if max_extents is None else max_extents) + 1
    bitmap = sys.getsizeof(np.zeros(0, dtype=bool)) + size // ALIGN
    a_list = sys.getsizeof([]) + _PTR * (n + n // 8 + 8)
    return bitmap + 4 * (a_list + n * sys.getsizeof(size))


def budget_for(nbytes: int) -> int:
    """The smallest budget that holds a region's tables and `nbytes` of its pages: the tables grow with the budget
    (the region is the budget's size), so this is a fixed point, reached in a step or two."""
    pages = extent_bytes(nbytes)
    limit = pages + table_bytes(pages)
    while pages + table_bytes(limit) > limit:
        limit = pages + table_bytes(limit)
    return limit


class HostRegion:
    """Byte buffers carved from one committed-on-demand host mapping of `capacity` bytes (see the module doc)."""

    supported = CPU_PAGE_SIZE == ALIGN  # an extent must be whole pages, or freeing one would decommit a neighbour

    def __init__(self, capacity: int, budget: MemoryBudget, keep_bytes: int | None = None,
                 owner: str = REGION_OWNER, max_extents: int | None = None) -> None:
        if not self.supported:
            raise ValueError(f"HostRegion needs {ALIGN}-byte pages, this system's are {CPU_PAGE_SIZE}")
        if keep_bytes is not None and keep_bytes < 0:
            raise ValueError(f"keep_bytes must be >= 0 or None, got {keep_bytes}")
        if max_extents is not None and max_extents < 1:
            raise ValueError(f"max_extents must be >= 1, got {max_extents}")
        self.max_extents = max_extents_for(capacity) if max_extents is None else max_extents
        # the tables are reserved before they exist (the arena's bitmap is allocated with it)
        self.meta_bytes = table_bytes(capacity, self.max_extents)
        if not budget.try_reserve(self.meta_bytes, owner):
            raise ValueError(f"a host region of {format_bytes(capacity)} needs {format_bytes(self.meta_bytes)} of its "
                             f"budget for its page map and extent tables, and {budget.name} has "
                             f"{format_bytes(budget.free_bytes)} free")
        try:
            self.arena = VirtualArena(extent_bytes(capacity), "cpu")  # the region's own count; the budget is below
        except BaseException:
            budget.release(self.meta_bytes, owner)
            raise
        self._flat = self.arena.tensor()  # (size,) uint8: buffers are slices of it (a slice is cheaper than as_strided)
        self.space = ExtentMap(self.arena.size)
        self.budget, self.owner = budget, owner
        self.keep_bytes = self.arena.size if keep_bytes is None else keep_bytes
        self._offs: list[int] = []  # offsets of the buffers out, sorted (a list, not a dict: its size has a bound)
        self._asked: list[int] = []  # the bytes each asked for (parallel to _offs)
        self.taken_bytes = 0  # their sum
        self._taken_extents = 0  # the same rounded up to whole extents (pages)
        self._lent = 0  # warm pages' reservation moved to a caller by try_reserve, for its next take
        self._lender = ""  # the owner that reservation went to (one at a time: try_reserve)
        self._reserved = self.meta_bytes  # what the region holds under `owner` in the budget
        self._lock = threading.Lock()
        self.prefaulted_bytes = 0  # pages warm_ahead / prefault committed ahead of a take
        self.prefault_seconds = 0.0  # and the seconds it took (off the takes' path: on the region's own thread)
        self._ahead = 0  # the chunk size the background warming works towards (warm_ahead); 0: stop
        self._ahead_least = 0  # what it warms where no free extent holds _ahead (the next chunk alone)
        self._warm_queued = False  # a warming submitted and not yet started
        self._warmer: ThreadPoolExecutor | None = None
        self._warming: Future | None = None
        # [lo, hi): bytes known committed throughout, the extent the warming last found (or made) warm. A take inside
        # it needs no look at the page flags (a numpy count that, after a model step, cost a swap-out more than its
        # copy of a small chunk); every decommit forgets it (free, trim, close), so it is never stale
        self._warm_span = (0, 0)

    @property
    def committed_bytes(self) -> int:
        return self.arena.committed_bytes

    @property
    def cached_bytes(self) -> int:
        """Committed pages no buffer uses (kept for the next take)."""
        return self.arena.committed_bytes - self._taken_extents

    @property
    def lent_bytes(self) -> int:
        """Bytes of cached pages whose reservation a caller holds until its next take (try_reserve)."""
        return self._lent

    @property
    def taken(self) -> dict[int, int]:
        """Offset -> bytes asked for, of every buffer out."""
        return dict(zip(self._offs, self._asked))

    def owns(self, buf: torch.Tensor) -> bool:
        return self._index(buf.data_ptr() - self.arena.address) is not None

    def try_reserve(self, nbytes: int, owner: str) -> bool:
        """Reserve `nbytes` for `owner` in the budget for a take that follows: from the free room, and where that is
        short (the tier at its high-water mark), by moving the shortfall's reservation from the region's warm free
        pages to `owner` (the take carves the chunk from them, so they are neither returned nor faulted in again).
        False (nothing reserved) if the room and the warm pages together fall short, or if another owner's loan is
        still outstanding (one borrower at a time: its next take, or unreserve, settles it)."""
        if self.budget.try_reserve(nbytes, owner):
            return True
        with self._lock:
            # One borrower at a time. `_lent` counts bytes for the next take, and a take uses whole warm pages: with
            # two callers' loans out, the first take could use pages the second counts on, and the second, returning
            # None, would repay fewer pages than were lent (the budget then over its limit). One owner may borrow
            # again before its take (a swap-out's chunk, then its merge's extra bytes: swap.py), because that one
            # take covers both.
            if self._lent and owner != self._lender:
                return False
            short = nbytes - max(0, self.budget.free_bytes)
            if short <= 0 or short > self.cached_bytes - self._lent:
                return False
            self.budget.transfer(short, self.owner, owner)  # the bytes stay reserved: nobody can take them between
            self._reserved -= short
            self._lent += short
            self._lender = owner
            if nbytes > short and not self.budget.try_reserve(nbytes - short, owner):  # the room went meanwhile
                self.budget.transfer(short, owner, self.owner)
                self._reserved += short
                self._lent -= short
                return False
            return True

    def unreserve(self, nbytes: int, owner: str) -> None:
        """Give back a reservation `try_reserve` made for a take that did not happen: what it moved from the warm
        pages goes back to the region, the rest is released."""
        with self._lock:
            back = min(self._lent, nbytes)
            if back:
                self.budget.transfer(back, owner, self.owner)
                self._reserved += back
                self._lent -= back
            if nbytes > back:
                self.budget.release(nbytes - back, owner)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A (nbytes,) uint8 buffer with its pages committed, or None: no free extent that large (or the region holds
        max_extents buffers), or the budget cannot hold the pages it adds beyond the `nbytes` the caller reserved
        (after the cache was trimmed). On None, pages lent to the caller's reservation are returned (its buffer will
        be one of its own, which that reservation now covers)."""
        if nbytes <= 0:
            raise ValueError(f"take needs a positive size, got {nbytes}")
        with self._lock:
            off = self.space.alloc(nbytes) if len(self._offs) < self.max_extents else None
            if off is None:  # fragmented: the caller's reservation fitted, no free extent is that large
                self._repay()
                return None
            ext = extent_bytes(nbytes)
            lo, hi = self._warm_span
            # pages to commit (0: warm already)
            cold = 0 if lo <= off and off + ext <= hi else ext - self.arena.committed_in(off, ext)
            paid = min(self._lent, nbytes)  # the caller's reservation covers this buffer now, lent pages included
            self._lent -= paid
            self._put(off, nbytes)
            if not self._settle(cold):  # reserve the cold pages before committing them; the cache gives way first
                self._trim_locked(extra=cold)
                if not self._settle(cold):  # the page rounding does not fit the budget even so: undo, and say so
                    self._untake(off)
                    self._lent += paid
                    self._repay()
                    settled = self._settle()  # (a decrease: the trim and the repaid pages)
                    assert settled, "a region's reservation went up while it gave pages back"
                    return None
            if cold:
                try:
                    self.arena.commit(off, ext)  # MADV_POPULATE_WRITE the pages not cached already
                except BaseException:  # (ENOMEM): the arena is unchanged; the extent and the loan back, nothing held
                    self._untake(off)
                    self._lent += paid
                    self._settle()
                    raise
            return self._flat[off : off + nbytes]

    def prefault(self, nbytes: int | None) -> int:
        """Commit the cold pages of the extent a take of `nbytes` would get now (first fit), so that take writes into
        warm pages; within keep_bytes of cached pages and what the budget grants (the region's owner reserves them,
        as it does its other cached pages). Returns the bytes committed. A step of PREFAULT_STEP bytes at a time:
        the lock is let go between steps, and each step looks for the extent again (a take may have come first)."""
        done = 0
        while True:
            with self._lock:
                # the background warming re-reads its target at every step: a later warm_ahead raises it, a trim
                # (idle, or a reservation short of room) sets it to 0 and so stops the warming at its next step
                target, least = (nbytes, nbytes) if nbytes is not None else (self._ahead, self._ahead_least)
                if self.arena.closed or target <= 0:
                    break
                need = extent_bytes(target)
                off = self._fit(need)
                if off is None and least < target:  # no extent of the whole target free: warm the next chunk's
                    need = extent_bytes(least)
                    off = self._fit(need)
                if off is None:
                    break
                cold = self._first_cold(off, need)
                if cold is None:  # warm already: the take that gets this extent need not look again
                    self._warm_span = (off, off + need)
                    break
                step = min(cold[1], PREFAULT_STEP, self.keep_bytes - self.cached_bytes, self.budget.free_bytes)
                step -= step % ALIGN
                if step <= 0 or not self._settle(step):  # cache full, or the budget has no room: stay cold
                    break
                try:
                    got = self.arena.commit(cold[0], step)
                except BaseException:  # (ENOMEM): nothing committed; the reservation back
                    self._settle()
                    raise
                self._settle()
                if not got:  # (cannot happen: the pages were cold) never spin
                    break
                done += got
        self.prefaulted_bytes += done
        return done

    def warm_ahead(self, nbytes: int, least: int | None = None) -> None:
        """`prefault(nbytes)` on the region's own thread, off the caller's path: the swap tier asks for its next
        chunk's pages after each take, so the swap-out that follows copies into warm pages instead of faulting in
        and zeroing each 4 KiB page inside its copy (issue 15: most of a 0.5B swap-out's time in a serving run).
        `least` (default nbytes): what to warm where no free extent holds nbytes (a full or fragmented region).
        A request made while one runs replaces its target, which the warming re-reads at every step; `trim` stops
        it. The thread runs while nothing else holds the lock (the commit is madvise through ctypes, which lets the
        GIL go)."""
        if nbytes <= 0 or self.keep_bytes == 0:
            return
        # (no lock: the warming reads these at each step; least first, so it never sees a least above the target)
        self._ahead_least = min(nbytes, least or nbytes)
        self._ahead = nbytes
        # a warming that has started may be past its last look at the target: queue another (one thread, so at
        # most one runs and one waits); one already waiting will read the new target when it starts
        if not self._warm_queued:
            if self._warmer is None:
                self._warmer = ThreadPoolExecutor(1, thread_name_prefix="memfit-region")
            self._warm_queued = True
            self._warming = self._warmer.submit(self._warm)

    def _warm(self) -> None:
        self._warm_queued = False
        t0 = time.perf_counter()
        try:
            self.prefault(None)  # the target as it stands at each step (warm_ahead / trim change it)
        finally:
            self.prefault_seconds += time.perf_counter() - t0

    def wait_warm(self) -> None:
        """Wait for the background warming (tests; close)."""
        if self._warming is not None:
            self._warming.exception()

    def free(self, buf: torch.Tensor) -> None:
        """Give `buf`'s extent back (the caller has released the `nbytes` it reserved for it). Its pages stay
        committed while the cache is within keep_bytes and the budget grants them, else they are returned."""
        off = buf.data_ptr() - self.arena.address
        with self._lock:
            if self._index(off) is None:
                raise ValueError("free of a buffer this region did not hand out (or freed twice)")
            nbytes = self._untake(off)
            if self.cached_bytes > self.keep_bytes or not self._settle():
                self._warm_span = (0, 0)
                self.arena.decommit(off, extent_bytes(nbytes))
                self._settle()

    def trim(self, nbytes: int | None = None) -> int:
        """Return cached pages, the highest first (first fit reuses the low ones), until at least `nbytes` are
        given back (None: every one not lent to a caller's reservation); the bytes given back."""
        with self._lock:
            self._ahead = 0  # a warming under way stops at its next step rather than commit again what goes back
            return self._trim_locked(nbytes)

    # ---- inside --------------------------------------------------------------------------------------------
    def _fit(self, need: int) -> int | None:
        """The offset a take of `need` bytes (whole pages) would get now, first fit, without taking it."""
        if len(self._offs) >= self.max_extents:
            return None
        i = self.space.first_fit(need)
        return None if i is None else self.space.start(i)

    def _first_cold(self, off: int, nbytes: int) -> tuple[int, int] | None:
        """(offset, bytes) of the first run of uncommitted pages in [off, off + nbytes), or None."""
        at = off
        for run_off, run_len in self.arena.committed_runs(off, nbytes):
            if run_off > at:
                return at, run_off - at
            at = max(at, run_off + run_len)
        return (at, off + nbytes - at) if at < off + nbytes else None

    def _index(self, off: int) -> int | None:
        i = bisect.bisect_left(self._offs, off)
        return i if i < len(self._offs) and self._offs[i] == off else None

    def _put(self, off: int, nbytes: int) -> None:
        i = bisect.bisect_left(self._offs, off)
        self._offs.insert(i, off)
        self._asked.insert(i, nbytes)
        self.taken_bytes += nbytes
        self._taken_extents += extent_bytes(nbytes)

    def _untake(self, off: int) -> int:
        i = self._index(off)
        assert i is not None
        del self._offs[i]
        nbytes = self._asked.pop(i)
        self.taken_bytes -= nbytes
        self._taken_extents -= extent_bytes(nbytes)
        self.space.free(off, nbytes)
        return nbytes

    def _repay(self) -> None:
        """The caller's reservation will cover a buffer of its own: the pages lent to it go (the highest)."""
        lent, self._lent = self._lent, 0
        if lent:
            self._trim_locked(lent)

    def _trim_locked(self, nbytes: int | None = None, extra: int = 0) -> int:
        before = self.arena.committed_bytes
        self._warm_span = (0, 0)  # pages are about to go back
        spare = self.cached_bytes - round_up(self._lent, ALIGN)  # lent pages stay: a take is about to carve them
        if nbytes is None and not self._lent:
            self.arena.decommit_many(self.space.free_extents)  # free extents are whole pages (ALIGN == page)
        else:
            left = spare if nbytes is None else min(nbytes, spare)
            if left > 0:
                for off, length in reversed(self.space.free_extents):
                    for run_off, run_len in reversed(self.arena.committed_runs(off, length)):
                        lo = max(run_off, off, run_off + run_len - left)  # the run's top `left` bytes (pages)
                        lo -= lo % ALIGN
                        left -= self.arena.decommit(lo, run_off + run_len - lo)
                        if left <= 0:
                            break
                    if left <= 0:
                        break
        self._settle(extra)  # (a take in progress: its cold pages, not yet committed, counted as if they were)
        return before - self.arena.committed_bytes

    def _settle(self, extra: int = 0) -> bool:
        """Bring the region's reservation to its tables + committed (+ `extra` pages about to be) - taken - lent;
        False (nothing changed) if the increase does not fit the budget. A decrease always succeeds."""
        want = self.meta_bytes + self.arena.committed_bytes + extra - self.taken_bytes - self._lent
        if want > self._reserved:
            if not self.budget.try_reserve(want - self._reserved, self.owner):
                return False
        elif want < self._reserved:
            self.budget.release(self._reserved - want, self.owner)
        self._reserved = want
        return True

    def close(self) -> None:
        """Return every page and reservation (the tables' included); buffers still out read zeros afterwards (do not
        use them). A reservation lent to a caller stays the caller's to release."""
        self._ahead = 0  # a warming under way stops at its next step
        self.wait_warm()  # the warming thread commits into the arena: let it finish first
        if self._warmer is not None:
            self._warmer.shutdown(wait=True)
            self._warmer = None
        with self._lock:
            self._offs.clear()
            self._asked.clear()
            self.taken_bytes = self._taken_extents = self._lent = 0
            self._flat = torch.empty(0, dtype=torch.uint8)  # this view would keep the mapping alive
            self._warm_span = (0, 0)
            self.arena.close()
            if self._reserved:
                self.budget.release(self._reserved, self.owner)
                self._reserved = 0
