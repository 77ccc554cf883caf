"""VirtualArena: commit/decommit change the range's resident memory exactly; views see data; lifetime."""
import gc

import pytest
import torch

from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded
from memfit.memory.vmem import CPU_PAGE_SIZE, VirtualArena

PAGE = CPU_PAGE_SIZE
MiB = 2**20


def vma_rss(addr: int) -> int | None:
    """Rss in bytes of the /proc/self/smaps entry containing `addr` (None if unmapped). Neighbouring
    arenas may share one entry, so tests compare deltas."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return None


def test_commit_and_decommit_change_rss_exactly():
    budget = MemoryBudget(64 * MiB)
    arena = VirtualArena(1 << 36, budget=budget, owner="t")  # 64 GiB of address space, nothing committed
    try:
        base = vma_rss(arena.address)
        assert arena.committed_bytes == 0 and budget.used_bytes == 0
        assert arena.commit(0, 3 * MiB) == 3 * MiB
        assert vma_rss(arena.address) - base == 3 * MiB
        assert arena.committed_bytes == budget.by_owner()["t"] == 3 * MiB
        assert arena.commit(MiB, MiB) == 0  # already committed: idempotent
        # unaligned ranges widen to whole pages; the far end of the range works too
        assert arena.commit_many([(10 * MiB + 5, 10), (arena.size - 100, 100)]) == 2 * PAGE
        assert vma_rss(arena.address) - base == 3 * MiB + 2 * PAGE
        assert arena.decommit(0, 2 * MiB) == 2 * MiB
        assert arena.committed_bytes == budget.used_bytes == MiB + 2 * PAGE
        assert vma_rss(arena.address) - base == MiB + 2 * PAGE
    finally:
        arena.close()
    assert budget.used_bytes == 0


def test_views_see_data_and_decommit_zeroes():
    arena = VirtualArena(16 * MiB)
    t = arena.tensor(torch.float32)
    arena.commit(0, 2 * PAGE)
    t[:10] = torch.arange(10.0)
    view = arena.view(torch.float32, (2, 5), (5, 1), offset_bytes=0)
    assert torch.equal(view, torch.arange(10.0).view(2, 5))
    strided = arena.view(torch.float32, (2, 3), (PAGE // 4, 1), offset_bytes=4)
    t[PAGE // 4 : PAGE // 4 + 4] = 7.0
    assert torch.equal(strided[1], torch.full((3,), 7.0)) and torch.equal(strided[0], torch.tensor([1.0, 2, 3]))
    arena.decommit(0, PAGE)
    assert torch.count_nonzero(t[: PAGE // 4]) == 0  # DONTNEED: the page reads as zeros again
    assert t[PAGE // 4] == 7.0
    with pytest.raises(ValueError, match="does not fit"):
        arena.view(torch.float32, (arena.size,), (1,))
    arena.close()


def test_reading_uncommitted_pages_commits_nothing():
    arena = VirtualArena(64 * MiB)
    base = vma_rss(arena.address)
    t = arena.tensor(torch.float32)
    assert float(t[: 8 * MiB // 4].sum()) == 0.0  # a read maps the kernel's zero page
    assert vma_rss(arena.address) == base and arena.committed_bytes == 0
    arena.close()


def test_budget_refusal_changes_nothing():
    budget = MemoryBudget(4 * PAGE)
    arena = VirtualArena(MiB, budget=budget, owner="kv")
    arena.commit(0, 3 * PAGE)
    before = vma_rss(arena.address)
    with pytest.raises(MemoryBudgetExceeded):
        arena.commit_many([(3 * PAGE, PAGE), (10 * PAGE, PAGE)])  # 2 pages, 1 fits: all or nothing
    assert not arena.try_commit_many([(3 * PAGE, 2 * PAGE)])
    assert arena.committed_bytes == 3 * PAGE == budget.used_bytes
    assert vma_rss(arena.address) == before
    assert not arena.is_committed(3 * PAGE, PAGE) and arena.is_committed(0, 3 * PAGE)
    with pytest.raises(ValueError, match="outside the arena"):
        arena.commit(MiB, 1)
    arena.close()


def test_prefault_thread_commits_ahead():
    budget = MemoryBudget(8 * MiB)
    arena = VirtualArena(64 * MiB, budget=budget)
    base = vma_rss(arena.address)
    arena.prefault([(0, MiB), (32 * MiB, MiB)])
    arena.prefault([(60 * MiB, 16 * MiB)])  # does not fit the arena -> surfaced by drain()
    with pytest.raises(ValueError, match="outside"):
        arena.drain()
    arena.prefault([(0, 64 * MiB)])  # does not fit the budget: skipped silently
    arena.drain()
    assert arena.committed_bytes == 2 * MiB == budget.used_bytes
    assert vma_rss(arena.address) - base == 2 * MiB
    arena.close()
    assert budget.used_bytes == 0


def test_close_unmaps_only_after_the_last_view():
    budget = MemoryBudget(MiB)
    arena = VirtualArena(MiB, budget=budget)
    addr = arena.address
    arena.commit(0, PAGE)
    t = arena.tensor(torch.int32)
    t[0] = 42
    view = t[:4]
    del t
    arena.close()  # decommits and returns the budget; the range stays mapped for `view`
    assert budget.used_bytes == 0 and arena.committed_bytes == 0
    assert vma_rss(addr) is not None
    assert int(view[0]) == 0  # decommitted memory reads zeros: no use-after-free, no crash
    with pytest.raises(RuntimeError, match="closed"):
        arena.commit(0, PAGE)
    del view
    gc.collect()
    assert vma_rss(addr) is None  # the last view went: unmapped

    arena2 = VirtualArena(MiB)
    addr2 = arena2.address
    arena2.close()  # no views: unmapped at once
    assert vma_rss(addr2) is None


def test_dropping_the_arena_returns_its_budget():
    budget = MemoryBudget(MiB)
    arena = VirtualArena(MiB, budget=budget)
    arena.commit(0, 4 * PAGE)
    del arena
    gc.collect()
    assert budget.used_bytes == 0


def test_committed_in_counts_the_pages_the_kernel_holds_in_a_range():
    """`committed_in` (HostRegion.take's check for cold pages) against the kernel's page map over ranges that cut
    committed runs at every edge: whole pages touching the range, each counted once."""
    from tests.llm.kv.kernel_pages import resident_pages

    arena = VirtualArena(64 * PAGE, "cpu", MemoryBudget(64 * MiB))
    arena.commit_many([(2 * PAGE, 5 * PAGE), (10 * PAGE + 1, 1), (20 * PAGE, 30 * PAGE)])
    arena.decommit(30 * PAGE, 2 * PAGE)
    arena.tensor()[: arena.size].view(-1)[::PAGE].max()  # reading cold pages maps the zero page: not committed
    held = resident_pages(arena.address, arena.size)
    for off in range(0, 64 * PAGE, PAGE // 2):
        for nbytes in (1, PAGE, 3 * PAGE + 7, 17 * PAGE, 64 * PAGE - off):
            if off + nbytes > arena.size:
                continue
            lo, hi = off // PAGE, -(-(off + nbytes) // PAGE)
            assert arena.committed_in(off, nbytes) == int(held[lo:hi].sum()) * PAGE, (off, nbytes)
            assert arena.committed_in(off, nbytes) == sum(n for _, n in arena.committed_runs(off, nbytes))
    with pytest.raises(ValueError, match="outside"):
        arena.committed_in(63 * PAGE, 2 * PAGE)
    arena.close()


def test_byte_view_is_the_uint8_view_and_refuses_a_range_past_the_arena():
    arena = VirtualArena(4 * PAGE, "cpu")
    arena.tensor().copy_(torch.arange(4 * PAGE, dtype=torch.int64).remainder(251).to(torch.uint8))
    got = arena.byte_view((3, 100), (PAGE, 1), 7)
    assert torch.equal(got, arena.view(torch.uint8, (3, 100), (PAGE, 1), 7))
    assert got.data_ptr() == arena.address + 7  # a view, not a copy
    with pytest.raises(RuntimeError, match="out of bounds"):
        arena.byte_view((2, 100), (4 * PAGE, 1), 0)
    arena.close()
    with pytest.raises(RuntimeError, match="closed"):
        arena.byte_view((1,), (1,), 0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        VirtualArena(0)
    with pytest.raises(ValueError, match="cpu and cuda"):
        VirtualArena(MiB, device="meta")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arena_commit_decommit():
    budget = MemoryBudget(1 << 30)
    arena = VirtualArena(1 << 32, device="cuda", budget=budget, owner="kv")  # 4 GiB of address space
    page = arena.page_size
    assert page >= 64 * 1024 and page == VirtualArena.page_size_for("cuda")
    free0 = torch.cuda.mem_get_info()[0]
    arena.commit(0, 8 * page)
    assert arena.committed_bytes == 8 * page == budget.used_bytes
    assert free0 - torch.cuda.mem_get_info()[0] >= 8 * page
    t = arena.tensor(torch.float32)
    assert t.is_cuda and t.data_ptr() == arena.address
    t[: 8 * page // 4] = 1.5  # only the committed part
    assert float(t[: 8 * page // 4].sum()) == 1.5 * 8 * page // 4
    arena.make_readable([(16 * page, 2 * page)])  # scratch-backed: reads are legal
    assert arena.scratch_bytes == page and budget.used_bytes == 9 * page
    _ = float(t[16 * page // 4 : 18 * page // 4].sum())
    arena.commit(16 * page, page)  # replaces the scratch mapping of that page
    t[16 * page // 4] = 3.0
    assert float(t[16 * page // 4]) == 3.0
    arena.decommit(0, 8 * page)
    arena.drop_scratch()
    torch.cuda.synchronize()
    assert arena.committed_bytes == page == budget.used_bytes
    arena.prefault([(32 * page, 2 * page)])  # on the background thread (binds the context there)
    arena.drain()
    assert arena.committed_bytes == 3 * page
    view = t[32 * page // 4 : 32 * page // 4 + 8]
    view.fill_(2.0)
    del t
    arena.close()
    assert budget.used_bytes == 0
    del view
    gc.collect()
