"""Block allocators (memory/blocks.py): the buddy-style block groups never hand a block out twice, merge freed
buddies back into whole groups, and lose nothing; checked against a plain set of what the test handed out."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memfit.memory.blocks import BlockGroups, BlockStack, runs_of


def test_runs_of_finds_maximal_consecutive_runs():
    assert runs_of([4, 5, 6, 1, 2, 9]) == [(4, 3), (1, 2), (9, 1)]
    assert runs_of([]) == []


def test_a_fresh_pool_is_its_largest_aligned_groups_and_heals_after_use():
    g = BlockGroups(100, min_group=4, max_group=64)
    assert g.free_groups() == [(0, 6), (64, 5), (96, 2)]  # 64 + 32 + 4
    a = g.take(10, owner="a")
    assert runs_of(a) == [(a[0], 10)]  # one run: a group of 16, 6 of them claimed for its growth
    assert g.claims() == {"a": (a[0] + 10, a[0] + 16)} and g.free == 90
    a += g.take(3, owner="a")  # growth continues the same run
    assert runs_of(a) == [(a[0], 13)]
    for b in a:
        g.give(b)
    g.release("a")
    assert g.free == 100 and g.free_groups() == [(0, 6), (64, 5), (96, 2)]


def test_claims_are_given_up_when_nothing_else_is_free():
    g = BlockGroups(16, min_group=8, max_group=8)
    a = g.take(1, owner="a")
    b = g.take(1, owner="b")  # 7 claimed by each: nothing left in the buddy lists
    assert g.free == 14
    c = g.take(14, owner="c")  # takes both claims
    assert sorted(a + b + c) == list(range(16)) and g.free == 0 and g.claims() == {}
    with pytest.raises(ValueError, match="free"):
        g.take(1)


def test_double_free_and_out_of_range_are_refused():
    g = BlockGroups(8, min_group=1, max_group=8)
    blk = g.take(1)[0]
    g.give(blk)
    with pytest.raises(ValueError, match="free already"):
        g.give(blk)
    with pytest.raises(ValueError, match="free already"):
        g.give(5)  # inside a free group that starts elsewhere
    with pytest.raises(ValueError, match="outside"):
        g.give(8)


class BuddyMachine(RuleBasedStateMachine):
    """Random takes (by a few owners), gives and releases; the test's own books are the independent measure."""

    @initialize(num_blocks=st.integers(1, 200), min_order=st.integers(0, 3), extra=st.integers(0, 4))
    def start(self, num_blocks: int, min_order: int, extra: int) -> None:
        self.n = num_blocks
        self.g = BlockGroups(num_blocks, min_group=1 << min_order, max_group=1 << (min_order + extra))
        self.held: dict[int | None, list[int]] = {o: [] for o in (0, 1, 2, 3, None)}  # owner -> blocks held
        # (owner None: takes that claim nothing ahead, as the prefix cache's do)

    def all_held(self) -> list[int]:
        return [b for bs in self.held.values() for b in bs]

    @rule(owner=st.sampled_from([0, 1, 2, 3, None]), n=st.integers(1, 40))
    def take(self, owner: int | None, n: int) -> None:
        if n > self.g.free:
            with pytest.raises(ValueError):
                self.g.take(n, owner)
            return
        mine = self.held[owner]
        got = self.g.take(n, owner, held=len(mine), after=mine[-1] if mine and owner is not None else None)
        assert len(got) == n
        self.held[owner] += got

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def give(self, data) -> None:
        owner = data.draw(st.sampled_from([o for o, bs in self.held.items() if bs]))
        blk = self.held[owner].pop(data.draw(st.integers(0, len(self.held[owner]) - 1)))
        self.g.give(blk)

    @rule(owner=st.sampled_from([0, 1, 2, 3, None]))
    def free_owner(self, owner: int | None) -> None:  # a sequence freed: all its blocks back, then its claim
        for blk in self.held[owner]:
            self.g.give(blk)
        self.held[owner] = []
        if owner is not None:
            self.g.release(owner)

    @invariant()
    def no_overlap_and_no_leak(self) -> None:
        held = self.all_held()
        assert len(held) == len(set(held)), "a block handed out twice"
        assert all(0 <= b < self.n for b in held)
        groups = self.g.free_groups()
        free_ids = [b for s, k in groups for b in range(s, s + (1 << k))]
        claimed = [b for lo, hi in self.g.claims().values() for b in range(lo, hi)]
        assert all(s % (1 << k) == 0 for s, k in groups), "a free group is not aligned to its size"
        # every block is exactly one of: held by the test, free in a group, claimed ahead by an owner
        assert sorted(held + free_ids + claimed) == list(range(self.n))
        assert self.g.free == len(free_ids) + len(claimed) == self.n - len(held)

    @invariant()
    def free_buddies_are_merged(self) -> None:
        groups = dict(self.g.free_groups())
        for s, k in groups.items():
            if k < self.g.max_order:
                assert groups.get(s ^ (1 << k)) != k, f"free buddies {s} and {s ^ (1 << k)} of order {k} not merged"

    def teardown(self) -> None:
        if not hasattr(self, "g"):
            return
        for owner in list(self.held):
            self.free_owner(owner)
        assert self.g.free == self.n and not self.g.claims()
        # all returned: the pool is its largest aligned groups again, as at the start
        assert self.g.free_groups() == BlockGroups(self.n, self.g.min_group, 1 << self.g.max_order).free_groups()


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_the_stack_hands_out_the_most_recently_freed_block():
    s = BlockStack(4)
    assert s.take(2) == [0, 1]
    s.give(0)
    assert s.take(1) == [0] and s.free == 2
