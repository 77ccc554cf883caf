"""HostRegion: buffers by extent from one mapping, freed pages kept warm, every byte in the budget.

What the region holds is checked against the kernel's page map (mincore over the whole range), not against the
region's own count."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.host_region import REGION_OWNER, HostRegion
from memfit.memory.vmem import CPU_PAGE_SIZE

pytestmark = pytest.mark.skipif(not HostRegion.supported, reason="HostRegion needs 4 KiB pages")
PAGE = CPU_PAGE_SIZE
CALLER = "caller"


def resident_bytes(region: HostRegion) -> int:
    """Bytes of the region's range the kernel holds in memory (mincore), independent of the region's count."""
    vec = (ctypes.c_ubyte * (region.arena.size // PAGE))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(region.arena.address), ctypes.c_size_t(region.arena.size),
                                     vec) == 0
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * PAGE


def take(region: HostRegion, budget: MemoryBudget, nbytes: int) -> torch.Tensor | None:
    """What a caller does: reserve what it asks for, then take it (giving the reservation back on None)."""
    if not budget.try_reserve(nbytes, CALLER):
        return None
    buf = region.take(nbytes)
    if buf is None:
        budget.release(nbytes, CALLER)
    return buf


def give(region: HostRegion, budget: MemoryBudget, buf: torch.Tensor) -> None:
    budget.release(buf.numel(), CALLER)
    region.free(buf)


def test_freed_pages_are_reused_without_new_commits_and_the_budget_matches_the_kernel():
    budget = MemoryBudget(64 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(64 * PAGE, budget)
    a = take(region, budget, 10 * PAGE + 100)
    assert a is not None and a.numel() == 10 * PAGE + 100
    a.fill_(7)
    assert resident_bytes(region) == region.committed_bytes == 11 * PAGE
    assert budget.used_bytes == 11 * PAGE  # 10 pages + 100 bytes asked; the rest of the 11th is the region's
    assert budget.by_owner()[REGION_OWNER] == PAGE - 100
    give(region, budget, a)
    assert resident_bytes(region) == 11 * PAGE and region.cached_bytes == 11 * PAGE  # kept warm
    assert budget.used_bytes == 11 * PAGE and budget.by_owner()[CALLER] == 0
    b = take(region, budget, 8 * PAGE)
    assert b is not None and b.data_ptr() == region.arena.address  # first fit: the warm pages again
    assert resident_bytes(region) == 11 * PAGE  # nothing newly committed
    assert budget.used_bytes == 11 * PAGE and budget.by_owner()[REGION_OWNER] == 3 * PAGE
    assert region.trim() == 3 * PAGE and resident_bytes(region) == 8 * PAGE
    assert budget.used_bytes == 8 * PAGE and budget.by_owner()[REGION_OWNER] == 0
    give(region, budget, b)
    region.close()
    assert budget.used_bytes == 0


def test_keep_bytes_zero_returns_pages_on_free():
    budget = MemoryBudget(32 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(32 * PAGE, budget, keep_bytes=0)
    a = take(region, budget, 5 * PAGE)
    a.fill_(1)
    give(region, budget, a)
    assert resident_bytes(region) == 0 and budget.used_bytes == 0


def test_a_full_budget_trims_the_cache_and_never_exceeds_its_limit():
    budget = MemoryBudget(16 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(16 * PAGE, budget)
    a = take(region, budget, 12 * PAGE)
    give(region, budget, a)  # 12 pages cached, reserved by the region
    assert budget.used_bytes == 12 * PAGE
    assert not budget.try_reserve(8 * PAGE, CALLER)  # the cache holds the room: a caller trims it first
    region.trim()
    b = take(region, budget, 8 * PAGE)
    assert b is not None and budget.used_bytes == 8 * PAGE <= budget.limit_bytes
    # the page rounding of a take that does not fit the budget: refused, nothing held
    budget.reserve(10, "other")
    c = take(region, budget, 8 * PAGE - 10)  # the caller's 8 pages - 10 bytes fit; the region's 10 bytes do not
    assert c is None and budget.used_bytes == 8 * PAGE + 10 and resident_bytes(region) == 8 * PAGE
    budget.release(10, "other")
    assert region.take(16 * PAGE) is None  # no free extent that large
    give(region, budget, b)
    region.close()
    assert budget.used_bytes == 0 and budget.by_owner().get(REGION_OWNER, 0) == 0


def test_free_rejects_foreign_and_double_frees():
    budget = MemoryBudget(8 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(8 * PAGE, budget)
    a = region.take(PAGE)
    with pytest.raises(ValueError, match="did not hand out"):
        region.free(torch.empty(PAGE, dtype=torch.uint8))
    region.free(a)
    with pytest.raises(ValueError, match="did not hand out"):
        region.free(a)
    with pytest.raises(ValueError, match="positive"):
        region.take(0)
    region.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6 * PAGE), st.integers(0, 1 << 20)), max_size=40),
       st.sampled_from([None, 0, 8 * PAGE]))
def test_random_takes_and_frees_keep_the_budget_equal_to_the_pages_held(ops, keep):
    budget = MemoryBudget(24 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(24 * PAGE, budget, keep_bytes=keep)
    out: list[tuple[torch.Tensor, int]] = []
    for is_take, nbytes, pick in ops:
        if is_take or not out:
            buf = take(region, budget, nbytes)
            if buf is not None:
                buf.fill_(pick % 251)
                out.append((buf, pick % 251))
        else:
            buf, _ = out.pop(pick % len(out))
            give(region, budget, buf)
        # every byte the kernel holds for the region is reserved, and nothing more
        assert budget.used_bytes == resident_bytes(region) <= budget.limit_bytes
        assert region.cached_bytes <= (region.arena.size if keep is None else keep)
        for buf, value in out:  # no buffer overlaps another: each still holds what was written into it
            assert int(buf.min()) == int(buf.max()) == value
    region.close()
    assert budget.used_bytes == budget.by_owner().get(CALLER, 0)


def resident_pages(region: HostRegion) -> list[int]:
    vec = (ctypes.c_ubyte * (region.arena.size // PAGE))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(region.arena.address), ctypes.c_size_t(region.arena.size),
                                     vec) == 0
    return [i for i, v in enumerate(vec) if v & 1]


def test_a_partial_trim_gives_back_the_highest_warm_pages_and_keeps_the_low_ones_first_fit_reuses():
    budget = MemoryBudget(32 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(32 * PAGE, budget)
    a, b = take(region, budget, 4 * PAGE), take(region, budget, 4 * PAGE)
    give(region, budget, a)
    give(region, budget, b)
    assert resident_pages(region) == list(range(8))
    assert region.trim(3 * PAGE - 100) == 3 * PAGE  # whole pages, from the top
    assert resident_pages(region) == list(range(5)) and budget.used_bytes == 5 * PAGE
    assert region.trim(0) == 0 and resident_pages(region) == list(range(5))
    c = take(region, budget, 4 * PAGE)
    assert c.data_ptr() == region.arena.address and resident_pages(region) == list(range(5))  # warm: no new page
    give(region, budget, c)
    region.close()
