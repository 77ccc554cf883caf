"""ScratchArena: a step commits exactly its layout's pages (read from /proc/self/pagemap, not from the arena's own
counters) and gives back all but `keep_bytes` when it ends (or keeps them, keep_bytes=None, until trim); regions
never overlap; outside a step, or past the capacity, nothing is handed out."""
import pytest
import torch

from memfit.memory import scratch
from memfit.memory.scratch import ALIGN, ScratchArena
from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE
from tests.llm.kv.kernel_pages import resident_pages


def resident(arena: ScratchArena) -> int:
    return int(resident_pages(arena.arena.address, arena.capacity).sum()) * PAGE


def test_a_step_holds_its_layout_and_gives_it_back_after():
    arena = ScratchArena(64 * PAGE, keep_bytes=PAGE)
    try:
        regions = {"a": 10 * PAGE, "b": 3 * PAGE}
        with arena.step(regions):
            assert resident(arena) == arena.committed_bytes == arena.budget.used_bytes == 13 * PAGE
            scratch.take("b", (3 * PAGE,), torch.uint8).fill_(1)
        assert resident(arena) == arena.committed_bytes == arena.budget.used_bytes == PAGE  # keep_bytes
        assert arena.high_water_bytes == 13 * PAGE
        assert scratch.take("a", (1,), torch.uint8) is None
    finally:
        arena.close()


def test_kept_pages_stay_for_the_next_step_until_trimmed():
    arena = ScratchArena(64 * PAGE, keep_bytes=None)
    try:
        assert resident(arena) == 0 and arena.committed_bytes == 0
        regions = {"a": 3 * PAGE + 8, "b": 5 * PAGE}  # "a" rounds up to a cache line: b starts off a page boundary
        need = ScratchArena.layout_bytes(regions)
        assert need == 3 * PAGE + ALIGN + 5 * PAGE
        with arena.step(regions) as active:
            assert active is arena and scratch.active() is arena
            a = scratch.take("a", (3 * PAGE // 4 + 2,), torch.float32)
            b = scratch.take("b", (5 * PAGE,), torch.uint8)
            a.fill_(1.0)
            b.fill_(7)
            assert a.data_ptr() + a.numel() * 4 <= b.data_ptr()  # no overlap
            assert torch.all(a == 1.0)  # b's writes did not reach a
        pages = -(-need // PAGE)
        assert resident(arena) == arena.committed_bytes == arena.budget.used_bytes == pages * PAGE
        assert arena.high_water_bytes == need
        with arena.step({"a": PAGE}):  # a smaller step reuses the pages: nothing new, nothing given back
            pass
        assert resident(arena) == pages * PAGE
        assert arena.trim(PAGE) == (pages - 1) * PAGE
        assert resident(arena) == arena.committed_bytes == PAGE
    finally:
        arena.close()


def test_take_refuses_what_the_step_did_not_lay_out():
    arena = ScratchArena(4 * PAGE)
    try:
        assert scratch.take("a", (4,), torch.float32) is None  # no step active
        with arena.step({"a": 16}):
            assert scratch.take("a", (4,), torch.float32) is not None
            assert scratch.take("a", (5,), torch.float32) is None  # larger than the region
            assert scratch.take("b", (1,), torch.float32) is None  # not laid out
        assert scratch.active() is None
        with arena.step({"a": 5 * PAGE}) as active:  # past the capacity: ordinary tensors, nothing committed
            assert active is None and scratch.take("a", (1,), torch.float32) is None
        assert arena.overflows == 1 and resident(arena) == 0  # the first step's page was given back after it
    finally:
        arena.close()


def test_steps_nest_and_restore_the_outer_arena():
    outer, inner = ScratchArena(2 * PAGE), ScratchArena(2 * PAGE)
    try:
        with outer.step({"x": 64}):
            with inner.step({"x": 64}):
                assert scratch.active() is inner
            assert scratch.active() is outer
    finally:
        outer.close()
        inner.close()


def test_a_step_inside_a_step_of_the_same_arena_is_refused_and_the_outer_views_survive():
    arena = ScratchArena(2 * PAGE)
    try:
        with arena.step({"x": 64}):
            outer = arena.take("x", (16,), torch.float32)
            outer.fill_(3.0)
            with pytest.raises(RuntimeError, match="already running"):
                with arena.step({"x": 64}):
                    pass
            assert scratch.active() is arena and bool((outer == 3.0).all())  # not re-laid, not given back
        with arena.step({"x": 64}):  # and the arena is usable afterwards
            assert arena.take("x", (16,), torch.float32) is not None
    finally:
        arena.close()


def test_capacity_is_whole_pages():
    arena = ScratchArena(PAGE + 1)
    try:
        assert arena.capacity == 2 * PAGE
        with pytest.raises(Exception):
            arena.budget.reserve(3 * PAGE, "x")  # the arena's own budget is its capacity
    finally:
        arena.close()


def test_fit_each_step_holds_the_last_steps_layout_and_during_a_step_only_its_own():
    """keep_bytes None with fit_each_step (the engine's arena): a step of the same size commits nothing new; a
    smaller one gives back the surplus before it runs (the kernel's count shows it inside the step), so a decode
    step after a prefill never holds the prefill's layout."""
    arena = ScratchArena(64 * PAGE, keep_bytes=None, fit_each_step=True)
    try:
        with arena.step({"a": 12 * PAGE}):
            pass
        assert resident(arena) == arena.committed_bytes == arena.budget.used_bytes == 12 * PAGE  # kept
        committed = []
        real = arena.arena._backend.map
        arena.arena._backend.map = lambda lo, hi: (committed.append(hi - lo), real(lo, hi))
        with arena.step({"a": 12 * PAGE}):
            assert resident(arena) == 12 * PAGE
        assert committed == []  # the same size again: no page committed
        with arena.step({"a": 2 * PAGE + 8}):
            assert resident(arena) == arena.committed_bytes == 3 * PAGE  # inside the smaller step: its own only
        assert resident(arena) == arena.budget.used_bytes == 3 * PAGE and committed == []
        with arena.step({"a": 5 * PAGE}):
            assert resident(arena) == 5 * PAGE
        assert sum(committed) > 0 and resident(arena) == 5 * PAGE
    finally:
        arena.close()
