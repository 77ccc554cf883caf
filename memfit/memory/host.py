"""HostArena: one anonymous host mapping for large, long-lived tensors that are read end to end (packed weights).

Why a mapping of its own: a decode step streams every weight once, so it runs at the speed of a sequential
read of a few hundred MB. On 4 KiB pages that read needs a new TLB entry every 64 cache lines, and hardware
prefetchers generally stop at 4 KiB boundaries; on transparent huge pages (2 MiB) it needs one per 32,768
lines. Measured on one Zen 4 core (benchmarks/blocked_linear.py, columns `blocked` against `blocked_4k`: the
same packed Llama stacks on huge and on 4 KiB pages): a bf16 1-row pass reads 25.9 -> 29.1 GB/s (0.1b) and
28.6 -> 32.0 (0.5b), 8 rows run 77.7 -> 87.2 and 86.8 -> 95.2 G MAC/s; +4-15% from 1 to 8 rows in bf16 and
fp32, nothing at 32 rows (compute-bound there). Linux gives huge pages to anonymous memory only where asked
(`madvise` mode, the default of most distributions) and torch's allocator never asks, so the arena does
(`MADV_HUGEPAGE`) on a 2 MiB-aligned range. Where THP is off (`never`) or unavailable the range simply stays
on 4 KiB pages.

Tensors are taken from the arena by bump allocation (64-byte aligned) and never freed one by one: the
mapping goes when the arena *and* every tensor taken from it are gone (each tensor keeps the owner alive
through its storage, as VirtualArena's do; see memfit/memory/vmem.py). Only touched pages are committed;
with huge pages a touch commits 2 MiB, so an arena holds at most one partly used huge page beyond what its
tensors need (`reserved_bytes` is rounded up to 2 MiB).
"""
from __future__ import annotations

import ctypes
import errno
import sys
from pathlib import Path

import torch

from memfit.memory.mapping import MappingOwner, VirtualMemoryError, get_libc, round_up

HUGE_PAGE = 2 << 20
_PROT_READ, _PROT_WRITE = 0x1, 0x2
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MADV_HUGEPAGE, _MADV_NOHUGEPAGE = 14, 15
_ALIGN = 64  # each tensor starts on a cache line
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's THP mode for anonymous memory: "always", "madvise", "never", or "unavailable"."""
    try:
        text = _THP.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


class HostArena:
    """`nbytes` of host memory, 2 MiB-aligned, on transparent huge pages where the kernel allows
    (`huge_pages=False`: ordinary 4 KiB pages, for comparison). `take(numel, dtype)` hands out tensors."""

    def __init__(self, nbytes: int, huge_pages: bool = True) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not sys.platform.startswith("linux"):
            raise VirtualMemoryError("HostArena needs Linux (mmap + madvise)")
        libc = get_libc()
        self.reserved_bytes = round_up(max(nbytes, 1), HUGE_PAGE)
        span = self.reserved_bytes + HUGE_PAGE  # room to align the start to 2 MiB
        addr = libc.mmap(None, span, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise VirtualMemoryError(f"mmap of {span} bytes failed ({errno.errorcode.get(err, err)})")
        addr = int(addr)
        start = round_up(addr, HUGE_PAGE)
        # Give back the unaligned head and the tail, so the mapping is exactly [start, start + reserved).
        if start > addr:
            libc.munmap(addr, start - addr)
        tail = addr + span - (start + self.reserved_bytes)
        if tail > 0:
            libc.munmap(start + self.reserved_bytes, tail)
        self.addr, self.huge_pages = start, huge_pages
        # Best effort either way (EINVAL where the kernel has no THP); 4 KiB pages are asked for explicitly
        # so that huge_pages=False means the same where THP is "always".
        libc.madvise(start, self.reserved_bytes, _MADV_HUGEPAGE if huge_pages else _MADV_NOHUGEPAGE)
        size = self.reserved_bytes
        self._owner = MappingOwner(lambda: get_libc().munmap(start, size))
        buf = (ctypes.c_uint8 * size).from_address(start)
        buf._memfit_owner = self._owner  # type: ignore[attr-defined]  # tensor -> buf -> owner: no use-after-free
        self._bytes = torch.frombuffer(buf, dtype=torch.uint8)  # (reserved_bytes,), touches nothing
        self.used_bytes = 0

    @staticmethod
    def bytes_for(nbytes: list[int]) -> int:
        """The arena size that holds tensors of these byte sizes, taken in this order (each 64-byte aligned)."""
        return sum(round_up(n, _ALIGN) for n in nbytes)

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A fresh (numel,) tensor of `dtype` from the arena (uninitialised: write it before reading)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        lo = round_up(self.used_bytes, _ALIGN)
        hi = lo + numel * itemsize
        if numel < 0 or hi > self.reserved_bytes:
            raise MemoryError(f"HostArena: {numel} x {dtype} does not fit ({self.reserved_bytes - lo} bytes left "
                              f"of {self.reserved_bytes})")
        self.used_bytes = hi
        return self._bytes[lo:hi].view(dtype)

    def huge_page_bytes(self) -> int:
        """Bytes of the arena backed by huge pages now (AnonHugePages of its mapping in /proc/self/smaps)."""
        try:
            lines = Path("/proc/self/smaps").read_text().splitlines()
        except OSError:
            return 0
        inside = False
        for line in lines:
            if not line.strip():
                continue
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= self.addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
        return 0
