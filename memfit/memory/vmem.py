"""VirtualArena: reserve a large contiguous virtual range once, commit and decommit its pages on demand.

Reserving address space costs nothing; only *committed* pages hold physical memory. So a KV cache can lay
out every sequence's K/V contiguously at its maximum length and still pay only for what it holds.

Backends, chosen from the device:
- CPU: one anonymous `mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)`; commit is
  `madvise(MADV_POPULATE_WRITE)` (Linux >= 5.14; otherwise one written byte per page), decommit is
  `madvise(MADV_DONTNEED)`. Transparent huge pages are switched off on the range (`MADV_NOHUGEPAGE`) so a
  touch commits 4 KiB, not 2 MiB, and the accounting is exact.
- CUDA: the driver's virtual-memory API through cuda-python (`cuMemAddressReserve`, then per page
  `cuMemCreate` + `cuMemMap` + `cuMemSetAccess`; `cuMemUnmap` + `cuMemRelease` to decommit), with the
  granularity from `cuMemGetAllocationGranularity` (2 MiB on current GPUs). Imported lazily.

The arena tracks committed pages in a bitmap, so commit/decommit are idempotent, and if it is given a
`MemoryBudget` it reserves every page in it *before* committing (all or nothing) and releases it after
decommitting: `budget.by_owner()[owner] == arena.committed_bytes` at all times.

Lifetime (why there is no use-after-free): the range is exposed as a torch tensor that wraps a buffer
object which owns the mapping; every view of the arena keeps that object alive through its storage, and
the range is unmapped only by that object's finaliser, i.e. after the arena *and* every tensor taken from
it are gone. `close()` decommits everything (returning its memory and budget) and drops the arena's own
references; if no views are left the range is unmapped at once. Tensors must not be used after
`close()`: on the CPU they would read zeros (and writing would fault pages in outside the budget).

Pitfall: never run a full-tensor op over an arena tensor (`.zero_()`, `.sum()`, `.clone()`, `t[:] = x`):
it touches, and so commits, every page of the range. Only index the rows you committed.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import queue
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from memfit.memory.budget import MemoryBudget
from memfit.memory.mapping import MappingOwner, VirtualMemoryError, get_libc, round_up

__all__ = ["CPU_PAGE_SIZE", "Prefaulter", "VirtualArena", "VirtualMemoryError", "strided_view"]

# Linux <sys/mman.h> constants (x86-64 and aarch64 share these values).
_PROT_READ, _PROT_WRITE = 0x1, 0x2
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x20, 0x4000
_MADV_DONTNEED, _MADV_NOHUGEPAGE, _MADV_POPULATE_WRITE = 4, 15, 23

CPU_PAGE_SIZE = mmap.PAGESIZE


# ---------------------------------------------------------------------------------------------------------
# CPU backend
# ---------------------------------------------------------------------------------------------------------
class _CpuBackend:
    populate_supported: bool | None = None  # learnt on first commit: does the kernel have MADV_POPULATE_WRITE?

    def __init__(self, size: int, huge_pages: bool) -> None:
        libc = get_libc()
        self.page_size = CPU_PAGE_SIZE
        self.size = round_up(size, self.page_size)
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        addr = libc.mmap(None, self.size, _PROT_READ | _PROT_WRITE, flags, -1, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise VirtualMemoryError(
                f"mmap of {self.size} bytes of address space failed ({errno.errorcode.get(err, err)}); lower "
                "max_seqs / max_seq_len, or check `ulimit -v` and vm.overcommit_memory (2 ignores MAP_NORESERVE)"
            )
        self.addr = int(addr)
        if not huge_pages:
            libc.madvise(self.addr, self.size, _MADV_NOHUGEPAGE)  # best effort: exact 4 KiB commits
        size_, addr_ = self.size, self.addr
        self.owner = MappingOwner(lambda: get_libc().munmap(addr_, size_))

    def tensor(self) -> torch.Tensor:
        """(size,) uint8 over the whole range; touches nothing."""
        buf = (ctypes.c_uint8 * self.size).from_address(self.addr)
        buf._memfit_owner = self.owner  # type: ignore[attr-defined]  # the tensor -> buf -> owner chain
        return torch.frombuffer(buf, dtype=torch.uint8)

    def map(self, lo: int, hi: int) -> None:
        """Populate pages [lo, hi). Their content is zero (fresh or after MADV_DONTNEED)."""
        addr, n = self.addr + lo * self.page_size, (hi - lo) * self.page_size
        libc = get_libc()
        if _CpuBackend.populate_supported is not False:
            if libc.madvise(addr, n, _MADV_POPULATE_WRITE) == 0:
                _CpuBackend.populate_supported = True
                return
            err = ctypes.get_errno()
            if err == errno.ENOMEM:
                raise VirtualMemoryError(f"out of memory committing {n} bytes (MADV_POPULATE_WRITE)")
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise VirtualMemoryError(f"madvise(MADV_POPULATE_WRITE) failed: {errno.errorcode.get(err, err)}")
            _CpuBackend.populate_supported = False  # old kernel: fall back to touching
        ctypes.memset(addr, 0, n)  # the pages are unpopulated (read as zero), so zeroing loses nothing

    def unmap(self, lo: int, hi: int) -> None:
        addr, n = self.addr + lo * self.page_size, (hi - lo) * self.page_size
        if get_libc().madvise(addr, n, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise VirtualMemoryError(f"madvise(MADV_DONTNEED) failed: {errno.errorcode.get(err, err)}")

    scratch_bytes = 0

    def make_readable(self, pages: Sequence[tuple[int, int]]) -> None:
        """Nothing to do: reading an uncommitted page maps the kernel's shared zero page (no RSS)."""

    def drop_scratch(self) -> None:
        pass

    def release(self) -> None:
        """Nothing to do: the mapping goes when its last tensor does (see the module docstring)."""


# ---------------------------------------------------------------------------------------------------------
# The arena
# ---------------------------------------------------------------------------------------------------------
class VirtualArena:
    """A reserved virtual range of `nbytes` (rounded up to pages) on `device`, committed page by page.

    Offsets and sizes given to commit/decommit are in bytes and are widened to whole pages. Thread-safe.
    """

    def __init__(
        self,
        nbytes: int,
        device: torch.device | str = "cpu",
        budget: MemoryBudget | None = None,
        owner: str = "vmem",
        huge_pages: bool = False,
    ) -> None:
        if nbytes <= 0:
            raise ValueError(f"a virtual arena needs a positive size, got {nbytes}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            from memfit.memory.vmem_cuda import _CudaBackend

            self._backend = _CudaBackend(nbytes, self.device)
        elif self.device.type == "cpu":
            self._backend = _CpuBackend(nbytes, huge_pages)
        else:
            raise ValueError(f"VirtualArena supports cpu and cuda devices, not {self.device}")
        self.page_size: int = self._backend.page_size
        self.size: int = self._backend.size
        self.address: int = self._backend.addr
        self.budget, self.owner = budget, owner
        self._committed = np.zeros(self.size // self.page_size, dtype=bool)  # one flag per page
        self._num_committed = 0
        self._scratch = 0  # bytes of the CUDA scratch page, 0 on the CPU
        self._lock = threading.RLock()
        self._closed = False
        self._base: torch.Tensor | None = self._backend.tensor()  # (size,) uint8
        self._prefaulter: Prefaulter | None = None

    @staticmethod
    def page_size_for(device: torch.device | str) -> int:
        """Commit granularity an arena on `device` will use (4 KiB on the CPU, 2 MiB on current GPUs)."""
        device = torch.device(device)
        if device.type != "cuda":
            return CPU_PAGE_SIZE
        from memfit.memory.vmem_cuda import cuda_granularity

        return cuda_granularity(device.index if device.index is not None else torch.cuda.current_device())

    @property
    def scratch_bytes(self) -> int:
        return self._scratch

    # ---- views --------------------------------------------------------------------------------------
    def tensor(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The whole range as a flat (size // itemsize,) tensor of `dtype`. A view: nothing is touched."""
        if self._base is None:
            raise RuntimeError("the arena is closed")
        return self._base.view(dtype)

    def view(self, dtype: torch.dtype, size: Sequence[int], stride: Sequence[int], offset_bytes: int = 0) -> torch.Tensor:
        """A strided view starting `offset_bytes` into the range (which must be a multiple of the itemsize)."""
        return strided_view(self.tensor(dtype), self.size, size, stride, offset_bytes)

    def byte_view(self, size: tuple[int, ...], stride: tuple[int, ...], offset_bytes: int) -> torch.Tensor:
        """`view(torch.uint8, ...)` in one torch call, without the Python checks (torch's own bound check stays: a
        view past the range raises RuntimeError): for a caller on a hot path, the swap tier's view at every swap."""
        if self._base is None:
            raise RuntimeError("the arena is closed")
        return self._base.as_strided(size, stride, offset_bytes)

    # ---- commit / decommit --------------------------------------------------------------------------
    @property
    def committed_bytes(self) -> int:
        """Physical bytes held: committed pages, plus the CUDA scratch page while one exists."""
        return self._num_committed * self.page_size + self._scratch

    def make_readable(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Make `ranges` safe to *read* without committing them: a no-op on the CPU (uncommitted pages
        read as zeros from the kernel's zero page); on CUDA uncommitted pages map one shared scratch page
        (its bytes are reserved in the budget and counted in `committed_bytes` until `drop_scratch`)."""
        with self._lock:
            if isinstance(self._backend, _CpuBackend):
                return
            pages = [self._pages(off, n) for off, n in ranges]
            had = self._backend.scratch_bytes
            if not had and self.budget is not None:
                self.budget.reserve(self.page_size, self.owner)
            try:
                self._backend.make_readable(pages)
            finally:
                now = self._backend.scratch_bytes
                if not had and not now and self.budget is not None:
                    self.budget.release(self.page_size, self.owner)
                self._scratch = now

    def drop_scratch(self) -> None:
        """Free the CUDA scratch page (see make_readable); ranges it backed are unreadable again."""
        with self._lock:
            if self._scratch:
                self._backend.drop_scratch()
                if self.budget is not None:
                    self.budget.release(self._scratch, self.owner)
                self._scratch = 0

    def _pages(self, offset: int, nbytes: int) -> tuple[int, int]:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside the arena (size {self.size})")
        return offset // self.page_size, -(-(offset + nbytes) // self.page_size)

    def _runs(self, ranges: Sequence[tuple[int, int]], want: bool) -> list[tuple[int, int]]:
        """Maximal page runs inside `ranges` whose committed flag != want (i.e. that need changing)."""
        runs: list[tuple[int, int]] = []
        for offset, nbytes in ranges:
            lo, hi = self._pages(offset, nbytes)
            flags = self._committed[lo:hi]
            todo = flags != want
            if not todo.any():
                continue
            if todo.all():
                runs.append((lo, hi))
                continue
            edges = np.flatnonzero(np.diff(np.concatenate(([False], todo, [False])).astype(np.int8)))
            runs.extend((lo + int(a), lo + int(b)) for a, b in zip(edges[::2], edges[1::2]))
        return runs

    def commit(self, offset: int, nbytes: int) -> int:
        return self.commit_many([(offset, nbytes)])

    def commit_many(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Commit every page touching `ranges`; all or nothing. Returns the bytes newly committed. Raises
        MemoryBudgetExceeded (nothing changed) if the budget can't take them."""
        return self._commit(ranges, strict=True)  # type: ignore[return-value]

    def try_commit_many(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Like commit_many but returns False instead of raising when the budget is short."""
        return self._commit(ranges, strict=False) is not None

    def _commit(self, ranges: Sequence[tuple[int, int]], strict: bool) -> int | None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the arena is closed")
            runs = self._runs(ranges, want=True)
            new_pages = sum(hi - lo for lo, hi in runs)
            nbytes = new_pages * self.page_size
            if nbytes and self.budget is not None:
                if strict:
                    self.budget.reserve(nbytes, self.owner)
                elif not self.budget.try_reserve(nbytes, self.owner):
                    return None
            done: list[tuple[int, int]] = []
            try:
                for lo, hi in runs:
                    self._backend.map(lo, hi)
                    done.append((lo, hi))
            except BaseException:
                for lo, hi in done:
                    self._backend.unmap(lo, hi)
                if nbytes and self.budget is not None:
                    self.budget.release(nbytes, self.owner)
                raise
            for lo, hi in runs:
                self._committed[lo:hi] = True
            self._num_committed += new_pages
            return nbytes

    def decommit(self, offset: int, nbytes: int) -> int:
        return self.decommit_many([(offset, nbytes)])

    def decommit_many(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Return the physical pages inside `ranges` (whole pages only: a page partly outside is
        decommitted too, so pass page-aligned ranges). Returns the bytes released."""
        with self._lock:
            runs = self._runs(ranges, want=False)
            for lo, hi in runs:
                self._backend.unmap(lo, hi)
                self._committed[lo:hi] = False
            pages = sum(hi - lo for lo, hi in runs)
            self._num_committed -= pages
            if pages and self.budget is not None:
                self.budget.release(pages * self.page_size, self.owner)
            return pages * self.page_size

    def committed_runs(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """(offset, nbytes) of each maximal run of committed pages touching [offset, offset + nbytes), by offset."""
        with self._lock:
            return [(lo * self.page_size, (hi - lo) * self.page_size)
                    for lo, hi in self._runs([(offset, nbytes)], want=False)]

    def committed_in(self, offset: int, nbytes: int) -> int:
        """Bytes of the committed pages among those touching [offset, offset + nbytes): the sum of `committed_runs`'
        lengths in one count over the page flags, without building the runs (HostRegion.take asks it at every
        swap-out, where the runs were a dozen numpy calls and a list)."""
        lo, hi = self._pages(offset, nbytes)
        with self._lock:
            return int(np.count_nonzero(self._committed[lo:hi])) * self.page_size

    def is_committed(self, offset: int, nbytes: int) -> bool:
        lo, hi = self._pages(offset, nbytes)
        return bool(self._committed[lo:hi].all())

    # ---- overlapped commit ----------------------------------------------------------------------------
    @property
    def prefaulter(self) -> Prefaulter:
        if self._prefaulter is None:
            self._prefaulter = Prefaulter(f"memfit-prefault-{self.owner}")
        return self._prefaulter

    def prefault(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Commit `ranges` on the background thread, if the budget allows (otherwise skip silently)."""
        ranges = list(ranges)
        self.prefaulter.submit(lambda: self.try_commit_many(ranges))

    def drain(self) -> None:
        """Wait for queued prefaults to finish."""
        if self._prefaulter is not None:
            self._prefaulter.drain()

    # ---- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Decommit everything (releasing its budget) and drop the arena's references. The range is
        unmapped once no tensor views it any more; tensors from the arena must not be used after this."""
        if self._prefaulter is not None:
            self._prefaulter.close()
        with self._lock:
            if self._closed:
                return
            self.decommit_many([(0, self.size)])
            self.drop_scratch()
            self._closed = True
            self._base = None
            self._backend.release()
            self._backend = None  # type: ignore[assignment]  # the mapping owner now lives only in views

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VirtualArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and self.budget is not None and self.committed_bytes:
                self.close()  # give the budget back; the memory itself goes with the last view
        except Exception:  # noqa: BLE001, S110 - never raise from a finaliser
            pass


def strided_view(flat: torch.Tensor, range_bytes: int, size: Sequence[int], stride: Sequence[int],
                 offset_bytes: int = 0) -> torch.Tensor:
    """A strided view of `flat` (a whole arena as one (n,) tensor of the view's dtype) starting `offset_bytes`
    in, checked to lie inside the arena's `range_bytes`."""
    itemsize = flat.element_size()
    if offset_bytes % itemsize:
        raise ValueError(f"offset {offset_bytes} is not a multiple of the {flat.dtype} itemsize {itemsize}")
    extent = offset_bytes + itemsize * (1 + sum((s - 1) * st for s, st in zip(size, stride)))
    if any(s == 0 for s in size):
        extent = offset_bytes
    if offset_bytes < 0 or extent > range_bytes:
        raise ValueError(f"view of {extent} bytes does not fit in the arena's {range_bytes}")
    return flat.as_strided(tuple(size), tuple(stride), offset_bytes // itemsize)


class Prefaulter:
    """One daemon thread running commit jobs in order, so page faults overlap with compute. Jobs are
    plain callables; ctypes/driver calls release the GIL while the kernel populates pages."""

    def __init__(self, name: str = "memfit-prefault") -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._errors: list[BaseException] = []
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except BaseException as exc:  # noqa: BLE001 - surfaced by drain()
                self._errors.append(exc)
            finally:
                self._queue.task_done()

    def submit(self, job: Callable[[], object]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the prefault thread is stopped")
        self._queue.put(job)

    def drain(self) -> None:
        """Block until every submitted job ran; re-raise the first error a job hit."""
        self._queue.join()
        if self._errors:
            err, self._errors = self._errors[0], []
            raise err

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
