"""SharedArena: a CPU virtual arena whose physical pages can be mapped at several addresses (page aliasing).

The foundation of prefix sharing inside a contiguous KV cache (issue 14): a new sequence whose prompt starts
with a cached prefix maps the prefix's *physical* pages at the start of its own slot, so its K/V stays one
contiguous strided view while the memory is held once. Writing into an aliased page first gives it a copy of
its own (copy-on-write, `make_private`).

How. The range is reserved as anonymous private memory that is never written (a read of a page that holds
nothing maps the kernel's zero page: no memory, as in `VirtualArena`), and its pages are backed by a memfd
(anonymous shared memory), `ftruncate`d to twice the arena's size (a sparse file: nothing is allocated).
Virtual page v has "its own" file page v; the second half of the file is a pool of spare file pages, for a
page whose own file page is still mapped elsewhere (it was shared, then released) and for copy-on-write
copies. At most one file page per mapped virtual page is ever live, so 2x always has a free one.
- commit: a virtual page is mapped onto its own file page if free, else a spare (`mmap(MAP_SHARED |
  MAP_FIXED)`), and `madvise(MADV_POPULATE_WRITE)` allocates it;
- alias(src, dst): `mmap(MAP_SHARED | MAP_FIXED)` of the *source's* file pages at the destination's
  addresses (one call per run of consecutive file pages): both addresses read and write the same pages;
- make_private: a page whose file page others map too gets a free file page with a copy of the data;
- release: the virtual page goes back to the anonymous reservation (`mmap(MAP_FIXED | MAP_ANONYMOUS)`): a
  stray read of it (a padded attention read) maps the zero page instead of allocating a file page; a file
  page no address maps any more is freed with `fallocate(PUNCH_HOLE)`.

Accounting. Physical memory is the file's pages, counted once however many addresses map them:
`committed_bytes` (and the budget's reservation, owner "kv" by default) is file pages in use x page size. It can
be checked independently: `allocated_bytes()` is the memfd's allocated blocks (`fstat().st_blocks`). RSS must
not be used to measure sharing: it counts a page once per mapping.

Linux only (memfd_create, MADV_POPULATE_WRITE >= 5.14, with a fall-back to touching pages).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from memfit.memory.budget import MemoryBudget
from memfit.memory.mapping import MappingOwner, VirtualMemoryError, get_libc, round_up
from memfit.memory.vmem import Prefaulter, strided_view

__all__ = ["SharedArena"]

_PROT_RW = 0x1 | 0x2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MADV_NOHUGEPAGE, _MADV_POPULATE_WRITE = 15, 23
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
PAGE = mmap.PAGESIZE


class SharedArena:
    """`nbytes` of address space over a memfd, committed page by page, with pages that can be shared.

    Offsets and sizes are bytes, page-aligned (aliasing whole pages only). Thread-safe. Views of the arena
    (`view`, `tensor`) keep the mapping alive; `close()` frees every page and the budget."""

    def __init__(self, nbytes: int, budget: MemoryBudget | None = None, owner: str = "kv") -> None:
        if nbytes <= 0:
            raise ValueError(f"a shared arena needs a positive size, got {nbytes}")
        self.page_size = PAGE
        self.size = round_up(nbytes, PAGE)
        self.budget, self.owner = budget, owner
        libc = get_libc()
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        libc.fallocate.restype = ctypes.c_int
        self._fd = os.memfd_create("memfit-shared-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, 2 * self.size)  # sparse: no page is allocated yet; the second half: spares
            addr = libc.mmap(None, self.size, _PROT_RW, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise VirtualMemoryError(f"mmap of a {self.size}-byte memfd failed ({errno.errorcode.get(ctypes.get_errno())})")
        except BaseException:
            os.close(self._fd)
            raise
        self.address = int(addr)
        libc.madvise(self.address, self.size, _MADV_NOHUGEPAGE)  # exact 4 KiB accounting
        size, fd, address = self.size, self._fd, self.address

        def release() -> None:
            get_libc().munmap(address, size)
            os.close(fd)

        self._owner = MappingOwner(release)
        n = self.size // PAGE
        self._file_of = np.arange(n, dtype=np.int64)  # virtual page -> the file page it maps
        self._mapped = np.zeros(n, dtype=bool)  # virtual page holds data (its own page or another's)
        self._refs = np.zeros(2 * n, dtype=np.int32)  # file page -> how many virtual pages map it
        # Free file pages of the second half: those given back (a stack), then the never used ones from _fresh on.
        # Not a list of all n up front: n Python ints are 36 B a page of address space (1.3 MB for memfit-tiny's
        # 128 MB arena at 32 sequences of 1024 tokens; 0.9% of the arena's size, which can be far past the budget),
        # held outside every ledger; a spare is taken only when a page is shared or copied.
        self._spares: list[int] = []
        self._fresh = n
        self._live = 0  # file pages mapped by at least one address
        self._lock = threading.RLock()
        self._closed = False
        self._prefaulter: Prefaulter | None = None
        self.device = torch.device("cpu")
        buf = (ctypes.c_uint8 * self.size).from_address(self.address)
        buf._memfit_owner = self._owner  # type: ignore[attr-defined]  # tensor -> buffer -> owner keeps it mapped
        self._base: torch.Tensor | None = torch.frombuffer(buf, dtype=torch.uint8)

    # ---- views ----------------------------------------------------------------------------------------
    def tensor(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        if self._base is None:
            raise RuntimeError("the arena is closed")
        return self._base.view(dtype)

    def view(self, dtype: torch.dtype, size: Sequence[int], stride: Sequence[int], offset_bytes: int = 0) -> torch.Tensor:
        return strided_view(self.tensor(dtype), self.size, size, stride, offset_bytes)

    def byte_view(self, size: tuple[int, ...], stride: tuple[int, ...], offset_bytes: int) -> torch.Tensor:
        """As VirtualArena.byte_view: a uint8 strided view in one torch call (torch checks the bounds)."""
        if self._base is None:
            raise RuntimeError("the arena is closed")
        return self._base.as_strided(size, stride, offset_bytes)

    # ---- accounting -------------------------------------------------------------------------------------
    @property
    def committed_bytes(self) -> int:
        """Physical bytes held: file pages mapped by at least one address, each counted once."""
        return self._live * PAGE

    def exclusive_bytes(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Physical bytes that releasing every range would free: pages that no address outside them maps."""
        with self._lock:
            pages = _span_pages(self._spans(ranges))
            if not len(pages):
                return 0
            files = self._file_of[pages[self._mapped[pages]]]
            ids, inside = np.unique(files, return_counts=True)  # how many of the ranges' pages map each file page
            return int(np.count_nonzero(self._refs[ids] == inside)) * PAGE

    def allocated_bytes(self) -> int:
        """What the kernel has allocated to the memfd (st_blocks), independent of this arena's bookkeeping."""
        return os.fstat(self._fd).st_blocks * 512

    def is_shared(self, offset: int, nbytes: int) -> bool:
        """Does some page of the range map a physical page that another address maps too?"""
        lo, hi = self._pages(offset, nbytes)
        return any(self._mapped[v] and self._refs[self._file_of[v]] > 1 for v in range(lo, hi))

    # ---- commit / release ------------------------------------------------------------------------------
    def _pages(self, offset: int, nbytes: int) -> tuple[int, int]:
        if offset % PAGE or nbytes % PAGE or offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"[{offset}, {offset + nbytes}) is not a page-aligned range inside the arena ({self.size} B)")
        return offset // PAGE, (offset + nbytes) // PAGE

    def try_commit(self, offset: int, nbytes: int) -> bool:
        """Give the unmapped pages of the range pages of their own (all or nothing); False if the budget is short."""
        return self.try_commit_many([(offset, nbytes)])

    def _spans(self, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """Byte ranges -> (n, 2) [lo, hi) page spans, checked in a few array operations (the KV cache passes one
        range per segment, 24-200 a call; a Python check per range cost more than the pages' syscalls)."""
        arr = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        off, n = arr[:, 0], arr[:, 1]
        bad = (off % PAGE != 0) | (n % PAGE != 0) | (off < 0) | (n < 0) | (off + n > self.size)
        if bad.any():
            o, k = (int(v) for v in arr[int(np.argmax(bad))])
            self._pages(o, k)  # raises the ValueError that names the range
        lo = off // PAGE
        return np.stack([lo, lo + n // PAGE], axis=1)  # (n, 2)

    def try_commit_many(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """`try_commit` over several ranges at once, all or nothing (the `VirtualArena` call the KV cache makes)."""
        with self._lock:
            self._check_open()
            pages = _span_pages(self._spans(ranges))
            todo = np.unique(pages[~self._mapped[pages]])
            need = len(todo) * PAGE
            if not need:
                return True
            if self.budget is not None and not self.budget.try_reserve(need, self.owner):
                return False
            taken: list[int] = []
            try:
                own = todo[self._refs[todo] == 0]  # own file page free: the common case
                for a, b in _runs(own):
                    self._map_run(a, b, a)
                    self._populate(a, b)
                    taken.extend(range(a, b))
                for v in todo[self._refs[todo] != 0].tolist():  # own page still shared elsewhere
                    f = self._free_file_page(v)
                    self._map_to(v, f)
                    self._file_of[v] = f
                    self._populate(v, v + 1)
                    taken.append(f)
            except BaseException:
                for a, b in _runs(todo):
                    self._reserve_run(a, b)
                self._file_of[todo] = todo
                for f in taken:
                    self._punch(f, f + 1)
                if self.budget is not None:
                    self.budget.release(need, self.owner)
                raise
            self._mapped[todo] = True
            self._refs[self._file_of[todo]] = 1
            self._live += len(todo)
            return True

    def decommit_many(self, ranges: Sequence[tuple[int, int]]) -> int:
        """`release` over several ranges at once (the `VirtualArena` name; a sequence's K and V in every layer are
        one call); returns the physical bytes freed."""
        with self._lock:
            before = self.committed_bytes
            pages = _span_pages(self._spans(ranges))
            gone = np.unique(pages[self._mapped[pages]])
            if not len(gone):
                return 0
            for a, b in _runs(gone):
                self._reserve_run(a, b)
            files = self._file_of[gone].copy()
            self._file_of[gone] = gone
            self._mapped[gone] = False
            # One pass over the pages' references, one hole punched per run of freed file pages and one budget
            # release, not one of each per page and range: per page and range these took ~10% of a bf16 prefill
            # batch's CPU time (benchmarks/prefill.py, 32 prompts finishing, profiled).
            np.subtract.at(self._refs, files, 1)
            freed = np.unique(files[self._refs[files] == 0])
            if len(freed):
                self._live -= len(freed)
                for a, b in _runs(freed):
                    self._punch(a, b)
                self._spares.extend(freed[freed >= len(self._file_of)].tolist())
                if self.budget is not None:
                    self.budget.release(PAGE * len(freed), self.owner)
            return before - self.committed_bytes

    def alias(self, src_offset: int, dst_offset: int, nbytes: int) -> None:
        """Map the physical pages behind [src, src + nbytes) at [dst, dst + nbytes) too. The destination pages
        must hold nothing; the source pages must hold data. No new memory is taken."""
        with self._lock:
            self._check_open()
            s_lo, s_hi = self._pages(src_offset, nbytes)
            d_lo, d_hi = self._pages(dst_offset, nbytes)
            if not self._mapped[s_lo:s_hi].all():
                raise ValueError("alias: the source range holds pages that were never committed")
            if self._mapped[d_lo:d_hi].any():
                raise ValueError("alias: the destination range already holds pages; release it first")
            files = self._file_of[s_lo:s_hi].copy()
            libc = get_libc()
            # One mmap per run of consecutive file pages (the source may itself be a patchwork of shared pages).
            breaks = np.flatnonzero(np.diff(files) != 1) + 1
            for a, b in zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [len(files)]))):
                addr = self.address + (d_lo + int(a)) * PAGE
                got = libc.mmap(addr, int(b - a) * PAGE, _PROT_RW, _MAP_SHARED | _MAP_FIXED, self._fd, int(files[a]) * PAGE)
                if got != addr:
                    raise VirtualMemoryError(f"mmap(MAP_FIXED) for aliasing failed ({errno.errorcode.get(ctypes.get_errno())})")
            self._file_of[d_lo:d_hi] = files
            self._mapped[d_lo:d_hi] = True
            np.add.at(self._refs, files, 1)

    def make_private(self, offset: int, nbytes: int) -> bool:
        """Copy-on-write: give every shared page of the range a copy of its own, before it is written. False
        (nothing changed) when the budget cannot take the copies."""
        with self._lock:
            self._check_open()
            lo, hi = self._pages(offset, nbytes)
            shared = [v for v in range(lo, hi) if self._mapped[v] and self._refs[self._file_of[v]] > 1]
            if shared and self.budget is not None and not self.budget.try_reserve(len(shared) * PAGE, self.owner):
                return False
            data = ctypes.create_string_buffer(PAGE)
            for v in shared:
                addr = self.address + v * PAGE
                ctypes.memmove(data, addr, PAGE)
                old, new = int(self._file_of[v]), self._free_file_page(v)
                self._map_to(v, new)
                self._populate(v, v + 1)
                ctypes.memmove(addr, data, PAGE)
                self._file_of[v] = new
                self._refs[new] = 1
                self._refs[old] -= 1  # others still map it: nothing to free
                self._live += 1
            return True

    def release(self, offset: int, nbytes: int) -> int:
        """Unmap the range's pages; a physical page is freed when no address maps it any more. Returns the
        physical bytes freed."""
        return self.decommit_many([(offset, nbytes)])

    # ---- internals ----------------------------------------------------------------------------------------
    def _free_file_page(self, v: int) -> int:
        """A file page no address maps: v's own if free, else a spare."""
        if self._refs[v] == 0:
            return v
        while self._spares:
            f = self._spares.pop()
            if self._refs[f] == 0:
                return f
        if self._fresh < len(self._refs):
            self._fresh += 1
            return self._fresh - 1
        raise AssertionError("no free file page: more live pages than virtual pages")  # unreachable, see docstring

    def _map_to(self, v: int, f: int) -> None:
        """Map virtual page v onto file page f."""
        self._map_run(v, v + 1, f)

    def _map_run(self, lo: int, hi: int, f: int) -> None:
        """Map virtual pages [lo, hi) onto file pages [f, f + hi - lo)."""
        addr = self.address + lo * PAGE
        if get_libc().mmap(addr, (hi - lo) * PAGE, _PROT_RW, _MAP_SHARED | _MAP_FIXED, self._fd, f * PAGE) != addr:
            raise VirtualMemoryError(f"mmap(MAP_FIXED) failed ({errno.errorcode.get(ctypes.get_errno())})")

    def _reserve_run(self, lo: int, hi: int) -> None:
        """Put virtual pages [lo, hi) back in the anonymous reservation (reads see zeros, hold nothing)."""
        addr = self.address + lo * PAGE
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        if get_libc().mmap(addr, (hi - lo) * PAGE, _PROT_RW, flags, -1, 0) != addr:
            raise VirtualMemoryError(f"mmap(MAP_FIXED | MAP_ANONYMOUS) failed ({errno.errorcode.get(ctypes.get_errno())})")

    def _populate(self, lo: int, hi: int) -> None:
        addr, n = self.address + lo * PAGE, (hi - lo) * PAGE
        if get_libc().madvise(addr, n, _MADV_POPULATE_WRITE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.ENOMEM:
            raise VirtualMemoryError(f"out of memory committing {n} bytes")
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise VirtualMemoryError(f"madvise(MADV_POPULATE_WRITE) failed: {errno.errorcode.get(err, err)}")
        for p in range(lo, hi):  # old kernel: write one byte per page (a hole reads as zero, so this keeps data)
            b = ctypes.c_uint8.from_address(self.address + p * PAGE)
            b.value = b.value

    def _punch(self, lo: int, hi: int) -> None:
        if get_libc().fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, lo * PAGE, (hi - lo) * PAGE) != 0:
            raise VirtualMemoryError(f"fallocate(PUNCH_HOLE) failed ({errno.errorcode.get(ctypes.get_errno())})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the arena is closed")

    # ---- the rest of VirtualArena's surface, so the virtual KV cache runs on either -------------------------
    scratch_bytes = 0  # CUDA's scratch page has no CPU counterpart: unmapped pages read as zeros

    def make_readable(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Nothing to do on the CPU (see VirtualArena.make_readable)."""

    def drop_scratch(self) -> None:
        pass

    @property
    def prefaulter(self) -> Prefaulter:
        if self._prefaulter is None:
            self._prefaulter = Prefaulter(f"memfit-prefault-{self.owner}")
        return self._prefaulter

    @property
    def closed(self) -> bool:  # (as VirtualArena.closed)
        return self._closed

    def drain(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.drain()

    def close(self) -> None:
        """Free every page and return the budget; the mapping goes with the last view of it."""
        if self._prefaulter is not None:
            self._prefaulter.close()
        with self._lock:
            if self._closed:
                return
            self.release(0, self.size)
            self._closed = True
            self._base = None


def _span_pages(spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Every page index of the [lo, hi) spans, in order, in a few array operations (the KV cache asks about
    thousands of small spans a step; a flatnonzero per span cost ~10 us each)."""
    if len(spans) == 0:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    lens = np.maximum(arr[:, 1] - arr[:, 0], 0)
    starts = np.cumsum(lens) - lens  # where each span begins in the output
    return np.repeat(arr[:, 0] - starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page indices -> maximal [lo, hi) runs (array operations: np.split made an array per run)."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    lo = np.concatenate((pages[:1], pages[breaks]))
    hi = np.concatenate((pages[breaks - 1], pages[-1:])) + 1
    return list(zip(lo.tolist(), hi.tolist()))
