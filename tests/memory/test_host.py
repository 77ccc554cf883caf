"""HostArena (memfit/memory/host.py): aligned bump allocation, lifetime, and huge pages where the kernel has them."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from memfit.memory.host import HUGE_PAGE, HostArena, transparent_huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="HostArena needs Linux")


def test_arena_is_aligned_and_takes_disjoint_aligned_tensors():
    arena = HostArena(1 << 20)
    assert arena.addr % HUGE_PAGE == 0 and arena.reserved_bytes == HUGE_PAGE  # 1 MiB rounds up to one huge page
    a = arena.take(3, torch.float32)  # 12 bytes
    b = arena.take(5, torch.bfloat16)
    c = arena.take(1000, torch.float32)
    ptrs = [t.data_ptr() for t in (a, b, c)]
    assert all(p % 64 == 0 for p in ptrs) and ptrs[0] == arena.addr
    assert ptrs[1] == arena.addr + 64 and ptrs[2] == arena.addr + 128  # 12 and 10 bytes, each in its own line
    assert (a.dtype, a.numel(), b.dtype, b.numel(), c.numel()) == (torch.float32, 3, torch.bfloat16, 5, 1000)
    assert arena.used_bytes == 128 + 4000
    a.fill_(1.0)
    b.fill_(2.0)
    c.fill_(3.0)  # no tensor writes into another
    assert a.tolist() == [1.0] * 3 and b.float().tolist() == [2.0] * 5 and c.sum().item() == 3000.0


def test_overflow_and_bad_sizes_are_refused():
    arena = HostArena(HUGE_PAGE)
    arena.take(HUGE_PAGE // 4 - 16, torch.float32)
    with pytest.raises(MemoryError, match="does not fit"):
        arena.take(32, torch.float32)
    arena.take(16, torch.float32)  # the refusal took nothing: the last 64 bytes are still there
    with pytest.raises(ValueError, match=">= 0"):
        HostArena(-1)


def test_tensors_outlive_the_arena_object():
    arena = HostArena(4 << 20)
    t = arena.take(1 << 20, torch.float32)
    t.copy_(torch.arange(1 << 20, dtype=torch.float32))
    del arena
    gc.collect()  # the mapping must stay: t's storage keeps its owner alive
    assert t[12345].item() == 12345.0 and t.sum().item() == float(sum(range(1 << 20)))


def _thp_fallbacks() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_fault_fallback "):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_huge_pages_back_the_arena_and_can_be_refused():
    before = _thp_fallbacks()
    huge = HostArena(8 << 20)
    huge.take(8 << 20, torch.uint8).fill_(1)
    small = HostArena(8 << 20, huge_pages=False)
    small.take(8 << 20, torch.uint8).fill_(1)
    if huge.huge_page_bytes() == 0 and _thp_fallbacks() > before:
        pytest.skip("the kernel had no free huge page just now (thp_fault_fallback rose)")
    assert huge.huge_page_bytes() >= HUGE_PAGE  # 4 whole huge pages touched
    assert small.huge_page_bytes() == 0  # MADV_NOHUGEPAGE: 4 KiB pages even where THP is "always"


def test_bytes_for_sizes_an_arena_that_takes_them_exactly():
    sizes = [12, 10, 4000, 64, 1]
    arena = HostArena(HostArena.bytes_for(sizes))
    for n in sizes:
        arena.take(n, torch.uint8)
    assert arena.used_bytes <= HostArena.bytes_for(sizes) == 64 + 64 + 4032 + 64 + 64
