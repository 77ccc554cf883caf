"""HostRegion: buffers by extent from one mapping, freed pages kept warm, every byte in the budget.

What the region holds is checked against the kernel's page map (mincore over the whole range), not against the
region's own count; its tables (the budget holds them, `meta_bytes`) against sys.getsizeof of the structures, and a
take at the high-water mark against the process's minor-fault count (getrusage)."""
from __future__ import annotations

import ctypes
import resource
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.extent_map import extent_bytes
from memfit.memory.host_region import REGION_OWNER, HostRegion, budget_for, table_bytes
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
    """What a caller does: reserve what it asks for (through the region: warm pages may lend it the room), then take
    it (giving the reservation back on None)."""
    if not region.try_reserve(nbytes, CALLER):
        return None
    buf = region.take(nbytes)
    if buf is None:
        budget.release(nbytes, CALLER)  # take returned what was lent: the caller's reservation is all its own now
    return buf


def table_sizes(region: HostRegion) -> int:
    """What the region's tables take, measured: the page bitmap and the four lists with the ints in them."""
    lists = [region.space._starts, region.space._lengths, region._offs, region._asked]
    return sys.getsizeof(region.arena._committed) + sum(sys.getsizeof(x) + sum(map(sys.getsizeof, x)) for x in lists)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def give(region: HostRegion, budget: MemoryBudget, buf: torch.Tensor) -> None:
    budget.release(buf.numel(), CALLER)
    region.free(buf)


def test_freed_pages_are_reused_without_new_commits_and_the_budget_matches_the_kernel():
    budget = MemoryBudget(64 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(64 * PAGE, budget)
    meta = region.meta_bytes
    assert budget.by_owner()[REGION_OWNER] == meta == table_bytes(64 * PAGE) > 0  # the tables, from the start
    a = take(region, budget, 10 * PAGE + 100)
    assert a is not None and a.numel() == 10 * PAGE + 100
    a.fill_(7)
    assert resident_bytes(region) == region.committed_bytes == 11 * PAGE
    assert budget.used_bytes == meta + 11 * PAGE  # 10 pages + 100 bytes asked; the rest of the 11th is the region's
    assert budget.by_owner()[REGION_OWNER] == meta + PAGE - 100
    give(region, budget, a)
    assert resident_bytes(region) == 11 * PAGE and region.cached_bytes == 11 * PAGE  # kept warm
    assert budget.used_bytes == meta + 11 * PAGE and budget.by_owner()[CALLER] == 0
    b = take(region, budget, 8 * PAGE)
    assert b is not None and b.data_ptr() == region.arena.address  # first fit: the warm pages again
    assert resident_bytes(region) == 11 * PAGE  # nothing newly committed
    assert budget.used_bytes == meta + 11 * PAGE and budget.by_owner()[REGION_OWNER] == meta + 3 * PAGE
    assert region.trim() == 3 * PAGE and resident_bytes(region) == 8 * PAGE
    assert budget.used_bytes == meta + 8 * PAGE and budget.by_owner()[REGION_OWNER] == meta
    give(region, budget, b)
    region.close()
    assert budget.used_bytes == 0


def test_keep_bytes_zero_returns_pages_on_free():
    budget = MemoryBudget(32 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(32 * PAGE, budget, keep_bytes=0)
    a = take(region, budget, 5 * PAGE)
    a.fill_(1)
    give(region, budget, a)
    assert resident_bytes(region) == 0 and budget.used_bytes == region.meta_bytes


def test_a_full_budget_lends_warm_pages_to_a_reservation_and_never_exceeds_its_limit():
    meta = table_bytes(16 * PAGE)
    budget = MemoryBudget(meta + 16 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(16 * PAGE, budget)
    a = take(region, budget, 12 * PAGE)
    give(region, budget, a)  # 12 pages cached, reserved by the region
    assert budget.used_bytes == meta + 12 * PAGE
    assert not budget.try_reserve(8 * PAGE, CALLER)  # the cache holds the room: a plain reservation does not fit
    assert region.try_reserve(8 * PAGE, CALLER)  # through the region: 4 pages of room, 4 of warm pages lent
    assert region.lent_bytes == 4 * PAGE and budget.by_owner()[REGION_OWNER] == meta + 8 * PAGE
    assert budget.used_bytes == budget.limit_bytes and region.trim() == 8 * PAGE  # a trim keeps the lent pages
    b = region.take(8 * PAGE)
    assert b is not None and region.lent_bytes == 0 and resident_bytes(region) == 8 * PAGE  # carved from them
    assert budget.used_bytes == meta + 8 * PAGE <= budget.limit_bytes
    # the page rounding of a take that does not fit the budget: refused, nothing held
    budget.reserve(8 * PAGE - 10, "other")
    c = take(region, budget, 1)  # the caller's byte fits; the region's page rounding does not
    assert c is None and budget.used_bytes == meta + 16 * PAGE - 10 and resident_bytes(region) == 8 * PAGE
    budget.release(8 * PAGE - 10, "other")
    assert region.take(16 * PAGE) is None  # no free extent that large
    # a reservation whose take never came: unreserve gives the lent part back to the region, the rest to the budget
    give(region, budget, b)
    budget.reserve(8 * PAGE, "other")
    assert region.try_reserve(8 * PAGE, CALLER) and region.lent_bytes == 8 * PAGE
    region.unreserve(8 * PAGE, CALLER)
    assert region.lent_bytes == 0 and budget.by_owner()[CALLER] == 0
    assert budget.by_owner()[REGION_OWNER] == meta + 8 * PAGE == meta + resident_bytes(region)
    budget.release(8 * PAGE, "other")
    region.close()
    assert budget.used_bytes == 0 and budget.by_owner().get(REGION_OWNER, 0) == 0


def test_a_second_owner_cannot_borrow_while_a_loan_is_out_and_the_pages_held_stay_within_the_limit():
    """Two callers' loans at once could outlive the pages behind them (a take uses whole pages, a loan counts
    bytes): A borrows 1 byte, B P+1, A's take uses a whole warm page, B's take returns None and repays too little.
    Only one owner borrows at a time; what the process holds (the tables and mincore's pages) is checked against the
    limit."""
    meta = table_bytes(24 * PAGE)
    budget = MemoryBudget(meta + 2 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(24 * PAGE, budget)
    give(region, budget, take(region, budget, 2 * PAGE))  # two warm pages; the budget full
    assert budget.used_bytes == budget.limit_bytes
    assert region.try_reserve(1, "a")
    assert not region.try_reserve(PAGE + 1, "b")  # a's loan is out
    assert region.try_reserve(PAGE + 1, "a")  # a again (a chunk, then its merge: one take covers both)
    assert region.take(PAGE + 2) is not None and region.lent_bytes == 0
    assert not region.try_reserve(1, "b")  # a's take used both warm pages: nothing left to lend
    assert meta + resident_bytes(region) <= budget.limit_bytes
    assert budget.by_owner()[REGION_OWNER] == meta + region.committed_bytes - region.taken_bytes - region.lent_bytes
    region.close()


def test_a_take_into_a_full_warm_region_faults_no_page():
    """The high-water mark: the budget holds exactly the region's tables and its warm pages. A chunk that size is
    reserved and taken without a page given back or faulted in again (the process's minor faults), and neither the
    kernel's pages nor the budget ever go past the limit."""
    pages = 512
    meta = table_bytes(pages * PAGE)
    budget = MemoryBudget(meta + pages * PAGE, Tier.HOST, name="swap")
    region = HostRegion(pages * PAGE, budget)
    give(region, budget, take(region, budget, pages * PAGE).fill_(1))
    assert resident_bytes(region) == pages * PAGE and budget.used_bytes == budget.limit_bytes  # all warm, full
    before = resident_pages(region)
    faults = minor_faults()
    assert region.try_reserve(pages * PAGE, CALLER)
    buf = region.take(pages * PAGE)
    assert buf is not None
    buf.fill_(2)  # the copy a swap-out makes
    faults = minor_faults() - faults
    assert faults < pages // 8, f"{faults} minor faults for a {pages}-page take into warm pages"
    assert resident_pages(region) == before
    assert budget.by_owner()[CALLER] == pages * PAGE and budget.by_owner()[REGION_OWNER] == meta
    assert budget.peak_bytes == budget.used_bytes == budget.limit_bytes
    give(region, budget, buf)
    region.close()


def test_the_budget_holds_the_region_tables_as_measured():
    """Its tables are reserved at construction, as many bytes as sys.getsizeof finds in them even at their
    largest (every buffer it may hold out, a free extent between each two); a take past max_extents is refused."""
    budget = MemoryBudget(64 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(64 * PAGE, budget, max_extents=20)
    assert budget.by_owner()[REGION_OWNER] == region.meta_bytes >= table_sizes(region)
    bufs = [take(region, budget, PAGE) for _ in range(20)]
    assert all(b is not None for b in bufs) and take(region, budget, PAGE) is None
    for b in bufs[::2]:
        give(region, budget, b)  # 10 free extents, 10 buffers out
    bufs = bufs[1::2] + [take(region, budget, PAGE) for _ in range(10)]  # out again: every free extent split
    assert len(region.space.free_extents) == 1 and len(region.taken) == 20
    assert table_sizes(region) <= region.meta_bytes
    assert budget.used_bytes == region.meta_bytes + resident_bytes(region)
    region.close()
    # a 4 GiB tier: about 1 MiB of bitmap and 0.6 MiB of lists, all counted
    big = HostRegion(4 << 30, MemoryBudget(4 << 30, Tier.HOST, name="swap"))
    assert sys.getsizeof(big.arena._committed) == (1 << 20) + sys.getsizeof(np.zeros(0, dtype=bool))
    assert table_sizes(big) < big.meta_bytes == big.budget.used_bytes < 2 << 20
    big.close()


def test_a_budget_too_small_for_the_tables_is_refused_and_budget_for_is_the_least_that_holds_a_chunk():
    with pytest.raises(ValueError, match="page map and extent tables"):
        HostRegion(64 * PAGE, MemoryBudget(table_bytes(64 * PAGE) - 1, Tier.HOST, name="swap"))
    for nbytes in (1, PAGE, 5 * PAGE + 1, 3 << 20, (1 << 30) + 17):
        limit = budget_for(nbytes)
        assert limit - table_bytes(limit) >= extent_bytes(nbytes) > limit - 1 - table_bytes(limit - 1)


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
        # every byte the kernel holds for the region is reserved (and its tables), and nothing more
        assert budget.used_bytes == region.meta_bytes + resident_bytes(region) <= budget.limit_bytes
        assert region.cached_bytes <= (region.arena.size if keep is None else keep)
        for buf, value in out:  # no buffer overlaps another: each still holds what was written into it
            assert int(buf.min()) == int(buf.max()) == value
    region.close()
    assert budget.used_bytes == budget.by_owner().get(CALLER, 0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "free", "warm", "trim"]), st.integers(1, 6 * PAGE),
                          st.integers(0, 1 << 20)), max_size=40),
       st.sampled_from([None, 0, 8 * PAGE]))
def test_warmings_trims_takes_and_frees_keep_the_budget_equal_to_the_pages_held(ops, keep):
    """A take inside the extent the warming last found warm skips its look at the page flags (`_warm_span`); after
    any mix of warmings, trims (whole or partial), takes and frees, the pages the kernel holds are still exactly
    those reserved: a take never skips pages a trim or a free gave back."""
    budget = MemoryBudget(24 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(24 * PAGE, budget, keep_bytes=keep)
    out: list[tuple[torch.Tensor, int]] = []
    for op, nbytes, pick in ops:
        if op == "take" or (op == "free" and not out):
            buf = take(region, budget, nbytes)
            if buf is not None:
                buf.fill_(pick % 251)
                out.append((buf, pick % 251))
        elif op == "free":
            buf, _ = out.pop(pick % len(out))
            give(region, budget, buf)
        elif op == "warm":
            region.prefault(nbytes)
        else:
            region.trim(None if pick % 2 else nbytes)
        assert budget.used_bytes == region.meta_bytes + resident_bytes(region) <= budget.limit_bytes
        for buf, value in out:
            assert int(buf.min()) == int(buf.max()) == value
    region.close()
    assert budget.used_bytes == budget.by_owner().get(CALLER, 0)


def test_the_take_of_the_extent_the_warming_made_warm_skips_the_page_flags(monkeypatch):
    """After a swap-out the warming commits the next chunk's extent and remembers it; the take that gets it then
    neither looks at the page flags (a numpy count that, after a model step, cost more than a small chunk's copy)
    nor commits anything. A take elsewhere still looks."""
    budget = MemoryBudget(64 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(32 * PAGE, budget)
    looks: list[int] = []
    count = region.arena.committed_in
    monkeypatch.setattr(region.arena, "committed_in", lambda off, n: looks.append(off) or count(off, n))
    held = take(region, budget, 4 * PAGE)  # cold: looked at
    assert looks == [0]
    assert region.prefault(8 * PAGE) == 8 * PAGE  # the extent past `held`
    buf = take(region, budget, 6 * PAGE)
    assert buf is not None and buf.data_ptr() == region.arena.address + 4 * PAGE and looks == [0]
    assert budget.used_bytes == region.meta_bytes + resident_bytes(region)
    give(region, budget, held)
    assert take(region, budget, 2 * PAGE) is not None and looks == [0, 0]  # outside the warmed extent: looked at
    region.close()


@pytest.mark.parametrize("give_back", ["trim", "partial-trim", "free"])
def test_a_take_after_pages_of_a_warmed_extent_went_back_commits_and_reserves_them_again(give_back):
    """The warming remembers the extent it found warm, so the take that gets it skips the page flags; pages given
    back since (a trim, whole or partial; a free past keep_bytes) must be committed and reserved again by that take."""
    budget = MemoryBudget(64 * PAGE, Tier.HOST, name="swap")
    region = HostRegion(32 * PAGE, budget)
    assert region.prefault(8 * PAGE) == 8 * PAGE
    if give_back == "free":
        first = take(region, budget, 4 * PAGE)  # carved from the warm extent
        region.keep_bytes = 0  # a region that keeps no page: the free returns the extent's pages
        give(region, budget, first)
    else:
        region.trim(None if give_back == "trim" else 3 * PAGE)
    assert budget.used_bytes == region.meta_bytes + resident_bytes(region)
    buf = take(region, budget, 8 * PAGE)
    assert buf is not None and buf.data_ptr() == region.arena.address
    buf.fill_(3)
    assert budget.used_bytes == region.meta_bytes + resident_bytes(region) == region.meta_bytes + region.committed_bytes
    give(region, budget, buf)
    region.close()


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
    assert resident_pages(region) == list(range(5)) and budget.used_bytes == region.meta_bytes + 5 * PAGE
    assert region.trim(0) == 0 and resident_pages(region) == list(range(5))
    c = take(region, budget, 4 * PAGE)
    assert c.data_ptr() == region.arena.address and resident_pages(region) == list(range(5))  # warm: no new page
    give(region, budget, c)
    region.close()


class RegionMachine(RuleBasedStateMachine):
    """Random reservations (plain or lent from warm pages), takes, frees, trims, reservations that are given back
    without a take, and another owner's reservations in the same budget, on a small region (at most 12 buffers, a
    budget of 10 pages beside its tables: often at its high-water mark).
    After every step, against the kernel's page map and sys.getsizeof rather than the region's counters: the budget
    holds exactly the other owner's bytes + the chunks' bytes + the region's pages beyond them + its tables, never
    more than its limit (nor ever did: the peak), and every chunk still holds what was written into it."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = MemoryBudget(table_bytes(24 * PAGE, 12) + 10 * PAGE, Tier.HOST, name="swap")
        self.region = HostRegion(24 * PAGE, self.budget, max_extents=12)
        self.out: list[tuple[torch.Tensor, int]] = []
        self.other: list[int] = []
        self.pending = 0  # a reservation made, its take not yet come

    @rule(nbytes=st.integers(1, 6 * PAGE), brim=st.one_of(st.none(), st.integers(-PAGE, PAGE)),
          value=st.integers(0, 250), then_take=st.booleans())
    def reserve(self, nbytes: int, brim: int | None, value: int, then_take: bool) -> None:
        if brim is not None:  # the high-water mark: what the free room and the warm pages hold, give or take a page
            nbytes = max(1, self.budget.free_bytes + self.region.cached_bytes + brim)
        if self.pending or not self.region.try_reserve(nbytes, CALLER):
            return
        if not then_take:  # the copy failed before a buffer held it
            self.pending = nbytes
            return
        buf = self.region.take(nbytes)
        if buf is None:
            self.budget.release(nbytes, CALLER)
            return
        buf.fill_(value)
        self.out.append((buf, value))

    @precondition(lambda self: self.pending)
    @rule()
    def unreserve(self) -> None:
        self.region.unreserve(self.pending, CALLER)
        self.pending = 0

    @precondition(lambda self: self.out)
    @rule(data=st.data())
    def free(self, data) -> None:
        buf, _ = self.out.pop(data.draw(st.integers(0, len(self.out) - 1)))
        give(self.region, self.budget, buf)

    @rule(nbytes=st.one_of(st.none(), st.integers(0, 8 * PAGE)), now=st.integers(0, 3))
    def trim(self, nbytes: int | None, now: int) -> None:
        if not now:  # (one time in four: trims would otherwise leave few warm pages to lend)
            self.region.trim(nbytes)

    @rule(nbytes=st.integers(1, 2 * PAGE))
    def other_reserves(self, nbytes: int) -> None:
        if self.budget.try_reserve(nbytes, "other"):
            self.other.append(nbytes)

    @precondition(lambda self: self.other)
    @rule()
    def other_releases(self) -> None:
        self.budget.release(self.other.pop(0), "other")

    @invariant()
    def the_budget_is_the_chunks_the_warm_pages_and_the_tables(self) -> None:
        chunks = sum(b.numel() for b, _ in self.out)
        owners = self.budget.by_owner()
        assert owners.get(CALLER, 0) == chunks + self.pending
        assert owners.get("other", 0) == sum(self.other)
        # a pending reservation's lent part is warm pages the kernel holds (counted there) but the caller reserved
        assert self.budget.used_bytes == sum(self.other) + self.pending - self.region.lent_bytes + \
            self.region.meta_bytes + resident_bytes(self.region) <= self.budget.limit_bytes
        assert self.budget.peak_bytes <= self.budget.limit_bytes
        assert table_sizes(self.region) <= self.region.meta_bytes
        assert self.region.lent_bytes <= self.region.cached_bytes and (self.pending or not self.region.lent_bytes)
        for buf, value in self.out:
            assert int(buf.min()) == int(buf.max()) == value

    def teardown(self) -> None:
        if self.pending:
            self.region.unreserve(self.pending, CALLER)
        for buf, _ in self.out:
            give(self.region, self.budget, buf)
        assert self.budget.used_bytes == sum(self.other) + self.region.meta_bytes + resident_bytes(self.region)
        self.region.close()
        assert self.budget.used_bytes == sum(self.other)


TestRegionMachine = RegionMachine.TestCase
TestRegionMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def test_prefault_commits_the_extent_the_next_take_gets_so_that_take_faults_no_page():
    """Issue 15: warming ahead commits the pages of the extent a take of that size gets next (first fit, past a
    buffer still out), every page in the budget under the region's owner; the take then commits nothing and its
    writes fault no page (minor faults), and what the kernel holds stays what the budget says."""
    pages = 256
    meta = table_bytes(4 * pages * PAGE)
    budget = MemoryBudget(meta + 4 * pages * PAGE, Tier.HOST, name="swap")
    region = HostRegion(4 * pages * PAGE, budget)
    held = take(region, budget, pages * PAGE).fill_(1)  # offset 0, out: the next take lands past it
    assert region.prefault(pages * PAGE) == pages * PAGE
    assert resident_bytes(region) == 2 * pages * PAGE == region.committed_bytes
    assert budget.by_owner()[REGION_OWNER] == meta + pages * PAGE  # the warm pages, reserved as cached ones are
    assert region.prefault(pages * PAGE) == 0  # warm already: nothing more
    faults = minor_faults()
    buf = take(region, budget, pages * PAGE)
    assert buf is not None and buf.data_ptr() == region.arena.address + pages * PAGE
    buf.fill_(2)
    faults = minor_faults() - faults
    assert faults < pages // 8, f"{faults} minor faults for a {pages}-page take into prefaulted pages"
    assert resident_bytes(region) == 2 * pages * PAGE and budget.by_owner()[REGION_OWNER] == meta
    give(region, budget, buf)
    give(region, budget, held)
    region.close()


def test_prefault_stays_within_keep_bytes_and_the_budget():
    """Warm pages are cached pages: none past keep_bytes, none the budget cannot grant (the budget never goes over
    its limit), and warm_ahead does nothing where the region keeps no page."""
    pages = 64
    meta = table_bytes(4 * pages * PAGE)
    budget = MemoryBudget(meta + 4 * pages * PAGE, Tier.HOST, name="swap")
    region = HostRegion(4 * pages * PAGE, budget, keep_bytes=pages * PAGE // 2)
    assert region.prefault(pages * PAGE) == pages * PAGE // 2 == resident_bytes(region)
    region.close()
    none = HostRegion(4 * pages * PAGE, budget, keep_bytes=0)
    none.warm_ahead(pages * PAGE)
    none.wait_warm()
    assert resident_bytes(none) == 0 and none.prefaulted_bytes == 0
    none.close()
    small = MemoryBudget(meta + pages * PAGE, Tier.HOST, name="swap")
    region = HostRegion(4 * pages * PAGE, small)
    assert small.try_reserve(pages * PAGE // 4, "other")  # room for three quarters of the pages asked
    region.warm_ahead(2 * pages * PAGE)
    region.wait_warm()
    assert region.prefaulted_bytes == resident_bytes(region) == 3 * pages * PAGE // 4
    assert small.used_bytes <= small.limit_bytes and small.peak_bytes <= small.limit_bytes
    assert small.by_owner()[REGION_OWNER] == meta + resident_bytes(region)
    region.close()


def test_a_second_warm_ahead_raises_the_target_of_a_warming_under_way():
    """The warming re-reads its target at every step: a larger request made while one runs is warmed in full
    (it was dropped: warm_ahead(4 MiB) then warm_ahead(64 MiB) warmed 4 MiB)."""
    mib = 2**20
    budget = MemoryBudget(table_bytes(128 * mib) + 128 * mib, Tier.HOST, name="swap")
    region = HostRegion(128 * mib, budget)
    region.warm_ahead(4 * mib)
    region.warm_ahead(64 * mib)
    region.wait_warm()
    assert resident_bytes(region) == 64 * mib == region.prefaulted_bytes
    region.close()


def test_a_trim_stops_a_warming_under_way():
    """Pages given back by a trim (the engine idle) are not committed again by a warming still running: it stops
    at its next step (it went on: 128 MiB resident after a trim that gave back 6 MiB)."""
    mib = 2**20
    budget = MemoryBudget(table_bytes(256 * mib) + 256 * mib, Tier.HOST, name="swap")
    region = HostRegion(256 * mib, budget)
    region.warm_ahead(256 * mib)
    while region.prefaulted_bytes == 0 and resident_bytes(region) == 0:  # under way
        pass
    region.trim()
    region.wait_warm()
    assert resident_bytes(region) == 0
    assert budget.by_owner()[REGION_OWNER] == table_bytes(256 * mib)
    region.close()


def test_a_region_without_room_for_the_whole_target_warms_the_next_chunk():
    """A full or fragmented region: no free extent holds the target (twice the largest chunk), one holds a chunk:
    that much is warmed (nothing was)."""
    mib = 2**20
    budget = MemoryBudget(table_bytes(5 * mib) + 5 * mib, Tier.HOST, name="swap")
    region = HostRegion(5 * mib, budget)
    held = take(region, budget, 2 * mib)
    region.warm_ahead(4 * mib, least=2 * mib)
    region.wait_warm()
    assert resident_bytes(region) - 2 * mib == extent_bytes(2 * mib)
    give(region, budget, held)
    region.close()
