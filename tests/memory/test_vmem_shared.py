"""SharedArena: page aliasing over a memfd. Sharing is checked against the kernel's own count of the memfd's
allocated blocks (never RSS, which counts a page once per mapping), and data through the views."""
from __future__ import annotations

import random

import pytest
import torch

from memfit.memory.budget import MemoryBudget
from memfit.memory.measure import anon_shmem_bytes
from memfit.memory.vmem_shared import PAGE, SharedArena


def _fill(arena: SharedArena, offset: int, nbytes: int, value: int) -> None:
    arena.tensor()[offset : offset + nbytes].fill_(value)


def test_aliased_pages_are_one_physical_copy_until_written():
    budget = MemoryBudget(64 * PAGE, name="kv")
    arena = SharedArena(32 * PAGE, budget)
    assert arena.allocated_bytes() == 0  # sparse until committed
    assert arena.try_commit(0, 4 * PAGE)
    _fill(arena, 0, 4 * PAGE, 7)
    arena.alias(0, 16 * PAGE, 3 * PAGE)  # the first 3 pages, also at page 16
    t = arena.tensor()
    assert torch.all(t[16 * PAGE : 19 * PAGE] == 7)
    # one physical copy: the kernel's allocated blocks, the arena's count and the budget agree
    assert arena.allocated_bytes() == arena.committed_bytes == budget.used_bytes == 4 * PAGE
    t[0] = 42  # a write through one address is seen through the other: the same page
    assert int(t[16 * PAGE]) == 42
    assert arena.is_shared(16 * PAGE, 3 * PAGE) and arena.is_shared(0, PAGE) and not arena.is_shared(3 * PAGE, PAGE)

    assert arena.make_private(16 * PAGE, PAGE)  # copy-on-write of the first aliased page
    t[16 * PAGE] = 1
    assert int(t[0]) == 42 and int(t[16 * PAGE]) == 1  # no longer shared ...
    assert torch.all(t[16 * PAGE + 1 : 17 * PAGE] == 7)  # ... and its other bytes were copied
    assert arena.allocated_bytes() == arena.committed_bytes == budget.used_bytes == 5 * PAGE


def test_a_shared_page_outlives_its_first_owner_and_is_freed_with_its_last():
    budget = MemoryBudget(64 * PAGE, name="kv")
    arena = SharedArena(16 * PAGE, budget)
    assert arena.try_commit(0, 2 * PAGE)
    _fill(arena, 0, 2 * PAGE, 9)
    arena.alias(0, 8 * PAGE, 2 * PAGE)
    assert arena.release(0, 2 * PAGE) == 0  # the source goes, its pages stay for the alias
    assert torch.all(arena.tensor()[8 * PAGE : 10 * PAGE] == 9)
    assert arena.allocated_bytes() == budget.used_bytes == 2 * PAGE
    assert arena.release(8 * PAGE, 2 * PAGE) == 2 * PAGE
    assert arena.allocated_bytes() == arena.committed_bytes == budget.used_bytes == 0
    assert arena.try_commit(8 * PAGE, PAGE)  # the destination maps its own (fresh, zero) page again
    assert torch.all(arena.tensor()[8 * PAGE : 9 * PAGE] == 0)


def test_misuse_is_refused_and_the_budget_bounds_commits_and_copies():
    budget = MemoryBudget(3 * PAGE, name="kv")
    arena = SharedArena(16 * PAGE, budget)
    with pytest.raises(ValueError, match="page-aligned"):
        arena.alias(1, 8 * PAGE, PAGE)
    with pytest.raises(ValueError, match="never committed"):
        arena.alias(0, 8 * PAGE, PAGE)
    assert arena.try_commit(0, 3 * PAGE)
    assert not arena.try_commit(4 * PAGE, PAGE)  # the budget is full
    arena.alias(0, 8 * PAGE, 2 * PAGE)  # aliasing takes no memory
    with pytest.raises(ValueError, match="already holds"):
        arena.alias(2 * PAGE, 8 * PAGE, PAGE)
    assert not arena.make_private(8 * PAGE, PAGE)  # a copy would pass the budget: nothing changes
    assert arena.is_shared(8 * PAGE, PAGE) and arena.allocated_bytes() == 3 * PAGE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_data_and_accounting_exact(seed):
    """A property test: random commits, aliases, copy-on-writes, writes and releases against a model of which
    page holds what; after every operation the data read through each address, the arena's count, the budget
    and the kernel's allocated blocks agree."""
    rng = random.Random(seed)
    n = 24
    budget = MemoryBudget(10 * n * PAGE, name="kv")
    arena = SharedArena(n * PAGE, budget)
    t = arena.tensor()
    content: dict[int, int] = {}  # virtual page -> a byte value every byte of it holds
    group: dict[int, int] = {}  # virtual page -> an id of the physical page it maps
    next_id = [0]

    def fresh() -> int:
        next_id[0] += 1
        return next_id[0]

    for _ in range(400):
        op = rng.choice(["commit", "alias", "private", "write", "release"])
        v = rng.randrange(n)
        if op == "commit" and v not in content:
            assert arena.try_commit(v * PAGE, PAGE)
            content[v], group[v] = 0, fresh()
        elif op == "alias" and content:
            src = rng.choice(sorted(content))
            free = [p for p in range(n) if p not in content]
            if free:
                dst = rng.choice(free)
                arena.alias(src * PAGE, dst * PAGE, PAGE)
                content[dst], group[dst] = content[src], group[src]
        elif op == "private" and v in content:
            assert arena.make_private(v * PAGE, PAGE)
            if sum(1 for p in group if group[p] == group[v]) > 1:
                group[v] = fresh()
        elif op == "write" and v in content:
            arena.make_private(v * PAGE, PAGE)
            if sum(1 for p in group if group[p] == group[v]) > 1:
                group[v] = fresh()
            value = rng.randrange(1, 256)
            t[v * PAGE : (v + 1) * PAGE].fill_(value)
            content[v] = value
        elif op == "release" and v in content:
            arena.release(v * PAGE, PAGE)
            del content[v], group[v]
        for p, value in content.items():
            assert int(t[p * PAGE]) == value and int(t[(p + 1) * PAGE - 1]) == value
        physical = len(set(group.values())) * PAGE
        assert arena.committed_bytes == budget.used_bytes == arena.allocated_bytes() == physical
    arena.close()
    assert budget.used_bytes == 0


def test_reading_pages_that_hold_nothing_allocates_nothing():
    """A padded attention read runs past a sequence's end into pages never committed or already released: they
    must read as zeros without the memfd allocating a page for them (the kernel's count stays the arena's)."""
    arena = SharedArena(16 * PAGE, MemoryBudget(64 * PAGE, name="kv"))
    t = arena.tensor()
    assert float(t.sum()) == 0 and arena.allocated_bytes() == 0  # never committed
    assert arena.try_commit(0, 4 * PAGE)
    _fill(arena, 0, 4 * PAGE, 5)
    arena.alias(0, 8 * PAGE, 2 * PAGE)
    arena.release(0, 4 * PAGE)  # pages 0-1 live on at 8-9, pages 2-3 are freed
    assert int(t[: 4 * PAGE].sum()) == 0 and int(t[8 * PAGE]) == 5
    assert arena.allocated_bytes() == arena.committed_bytes == 2 * PAGE


def test_an_arena_holds_its_page_map_and_no_list_of_spare_pages():
    """What building an arena makes the process hold, read from the kernel (RssAnon + RssShmem): its page -> file
    page map (8 B a page of address space) and little more, not a Python list of every spare file page (another
    36 B a page: 9.4 MB for this 1 GiB arena, outside every ledger); spares are taken as pages are shared or copied,
    and a page freed twice over its life (shared, then copied) still finds one."""
    pages = (1 << 30) // PAGE
    before = anon_shmem_bytes()
    arena = SharedArena(pages * PAGE, MemoryBudget(64 * PAGE, name="kv"))
    held = anon_shmem_bytes() - before
    assert held <= 10 * pages, held / pages
    assert arena.try_commit(0, 2 * PAGE)
    _fill(arena, 0, 2 * PAGE, 3)
    arena.alias(0, 8 * PAGE, 2 * PAGE)
    arena.release(0, 2 * PAGE)  # pages 8-9 keep file pages 0-1
    assert arena.try_commit(0, 2 * PAGE)  # page 0's own file page is taken: two spares
    assert arena.make_private(8 * PAGE, 2 * PAGE) and int(arena.tensor()[8 * PAGE]) == 3
    assert arena.allocated_bytes() == arena.committed_bytes == 4 * PAGE
    arena.close()


def test_commit_many_is_all_or_nothing_and_exclusive_bytes_counts_what_release_would_free():
    budget = MemoryBudget(6 * PAGE, name="kv")
    arena = SharedArena(32 * PAGE, budget)
    assert arena.try_commit_many([(0, 2 * PAGE), (8 * PAGE, 2 * PAGE)])
    assert not arena.try_commit_many([(16 * PAGE, 2 * PAGE), (24 * PAGE, 3 * PAGE)])  # 5 pages > 2 left
    assert arena.allocated_bytes() == budget.used_bytes == 4 * PAGE  # nothing of the refused call stayed
    arena.alias(0, 4 * PAGE, 2 * PAGE)
    assert arena.exclusive_bytes([(0, 2 * PAGE)]) == 0  # also mapped at 4-5: releasing 0-1 frees nothing
    assert arena.exclusive_bytes([(0, 2 * PAGE), (4 * PAGE, 2 * PAGE)]) == 2 * PAGE
    assert arena.decommit_many([(0, 2 * PAGE), (4 * PAGE, 2 * PAGE)]) == 2 * PAGE
    assert arena.allocated_bytes() == budget.used_bytes == arena.committed_bytes == 2 * PAGE


def test_multi_range_calls_check_every_range_and_skip_what_is_already_done():
    budget = MemoryBudget(64 * PAGE, name="kv")
    arena = SharedArena(16 * PAGE, budget)
    for bad in ([(0, PAGE), (PAGE, 100)], [(0, PAGE), (15 * PAGE, 2 * PAGE)], [(-PAGE, PAGE)]):
        with pytest.raises(ValueError, match="page-aligned"):
            arena.try_commit_many(bad)
        with pytest.raises(ValueError, match="page-aligned"):
            arena.decommit_many(bad)
    assert arena.committed_bytes == budget.used_bytes == 0  # a refused call changed nothing
    assert arena.try_commit_many([(0, 2 * PAGE), (PAGE, 2 * PAGE), (8 * PAGE, PAGE)])  # overlaps counted once
    assert arena.allocated_bytes() == arena.committed_bytes == budget.used_bytes == 4 * PAGE
    assert arena.try_commit_many([(0, 3 * PAGE), (8 * PAGE, PAGE)])  # all there already: nothing taken
    assert arena.try_commit_many([])
    assert budget.used_bytes == 4 * PAGE
    assert arena.decommit_many([(2 * PAGE, 7 * PAGE), (0, PAGE)]) == 3 * PAGE  # page 1 stays
    assert arena.decommit_many([]) == 0
    assert arena.allocated_bytes() == arena.committed_bytes == budget.used_bytes == PAGE


def test_byte_view_is_the_uint8_view_and_refuses_a_range_past_the_arena():
    arena = SharedArena(4 * PAGE, MemoryBudget(64 * PAGE, name="kv"))
    assert arena.try_commit(0, 4 * PAGE)
    arena.tensor().copy_(torch.arange(4 * PAGE, dtype=torch.int64).remainder(251).to(torch.uint8))
    got = arena.byte_view((3, 100), (PAGE, 1), 7)
    assert torch.equal(got, arena.view(torch.uint8, (3, 100), (PAGE, 1), 7)) and got.data_ptr() == arena.address + 7
    with pytest.raises(RuntimeError, match="out of bounds"):
        arena.byte_view((2, 100), (4 * PAGE, 1), 0)
    arena.close()
