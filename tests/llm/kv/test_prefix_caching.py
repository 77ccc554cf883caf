"""Automatic prefix caching in both KV caches (virtual: page aliasing over a memfd; paged: shared blocks).

Each position's K/V here is a function of the whole prefix up to it (as a model's is): `codes(tokens)[p]`
depends on tokens[0..p]. So a sequence that reused another's rows reads exactly what it would have written,
and any row corrupted by sharing (a write into a page another sequence maps) shows up as a wrong code.
Memory is checked against measures the caches do not keep: the memfd's allocated blocks (`allocated_bytes`,
st_blocks, each physical page once however many slots map it; never RSS) for the virtual cache, and the block
tables against the pool and the budget ledger for the paged cache.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.llm.kv.paged import PagedKVCache
from memfit.llm.kv.virtual import VirtualKVCache
from memfit.memory.budget import MemoryBudget
from memfit.memory.vmem_shared import PAGE
from tests.llm.kv.kernel_pages import assert_paged_tables_consistent, memfd_mapped_bytes

# per-layer rows: 128 B (32 tokens a page); head-major: 64 B (64 a page); token-major: 512 B (a block of 16 = 2 pages)
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, max_seq_len=256)
LAYOUTS = {"per-layer": {}, "head-major": {"head_major": True}, "token-major": {"token_major": True}}


def codes(tokens: list[int]) -> list[int]:
    """codes[p]: a small integer (exact in float32) determined by tokens[0..p]."""
    out, c = [], 17
    for t in tokens:
        c = hash((c, t)) % 1_000_003
        out.append(c % 4096)
    return out


def write(cache, seq_id: int, tokens: list[int], start: int, n: int) -> None:
    plan = cache.plan_step([SeqStep(seq_id, start, n, tokens[start : start + n])])
    c = torch.tensor(codes(tokens)[start : start + n], dtype=torch.float32)
    for layer in range(LAYOUT.num_layers):
        k = (c + 0.25 * layer).view(n, 1, 1).expand(n, LAYOUT.num_kv_heads, LAYOUT.head_dim).contiguous()
        cache.write(layer, plan, k, -k)


def assert_rows(cache, seq_id: int, tokens: list[int]) -> None:
    """Every row the sequence holds is the one its own tokens give."""
    n = cache.num_tokens(seq_id)
    plan = cache.plan_step([SeqStep(seq_id, n, 0)])
    want = torch.tensor(codes(tokens[:n]), dtype=torch.float32)
    for layer in range(LAYOUT.num_layers):
        k, v = cache.context(layer, plan, 0)  # (n, Hkv, D)
        exp = (want + 0.25 * layer).view(n, 1, 1).expand_as(k)
        assert torch.equal(k, exp), f"seq {seq_id} layer {layer}: K rows differ"
        assert torch.equal(v, -exp), f"seq {seq_id} layer {layer}: V rows differ"


def start(cache, seq_id: int, tokens: list[int]) -> int:
    """Allocate with prefix caching and write the rest; returns the tokens that came from the cache."""
    cached = cache.try_allocate_prefix(seq_id, tokens, len(tokens))
    assert cached is not None
    write(cache, seq_id, tokens, cached, len(tokens) - cached)
    return cached


def rewrite(cache, seq_id: int, tokens: list[int], keep: int, new: list[int]) -> list[int]:
    """A session's next turn: keep the first `keep` tokens, write `new` after them; returns the tokens."""
    cache.truncate(seq_id, keep)
    tokens = tokens[:keep] + new
    assert cache.try_grow(seq_id, len(tokens))
    write(cache, seq_id, tokens, keep, len(new))
    return tokens


def physical(cache) -> int:
    """The independent measure of what the cache holds, checked equal to its own counters and its budget."""
    if isinstance(cache, VirtualKVCache):
        held = cache.arena.allocated_bytes()
        assert held == cache.committed_bytes == cache.budget.by_owner().get("kv", 0)
        return held
    return assert_paged_tables_consistent(cache, list(cache._seqs))


def virtual(limit: int = 1 << 24, **kw) -> VirtualKVCache:
    return VirtualKVCache(LAYOUT, MemoryBudget(limit, name="kv_budget"), max_seqs=kw.pop("max_seqs", 4), eager_pages=0,
                          prefault=False, prefix_caching=True, **kw)


def paged(limit: int = 1 << 24, num_blocks: int = 256) -> PagedKVCache:
    return PagedKVCache(LAYOUT, MemoryBudget(limit, name="kv_budget"), block_size=16, num_blocks=num_blocks,
                        prefix_caching=True)


A = [(7 * i + 3) % 500 for i in range(200)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_virtual_maps_a_live_prefix_once_and_copies_only_the_partial_block(layout):
    cache = virtual(**LAYOUTS[layout])
    bt = cache.prefix_block
    assert start(cache, 1, A) == 0
    alone = physical(cache)
    b = A[:150] + [900 + i for i in range(30)]
    cached = start(cache, 2, b)
    assert cached == 150  # full blocks aliased, the rest of the matching rows copied from the live holder
    assert_rows(cache, 1, A)
    assert_rows(cache, 2, b)
    shared_pages = (150 // bt) * cache.block_pages * cache.num_segments
    # b holds its own pages for everything past the shared blocks, and not one page more
    assert physical(cache) - alone == cache.bytes_needed(len(b)) - shared_pages * PAGE
    assert cache.prefix_stats.hit_tokens == 150


@pytest.mark.parametrize("layout", LAYOUTS)
def test_virtual_copy_on_write_keeps_the_other_sequence_intact(layout):
    cache = virtual(**LAYOUTS[layout])
    start(cache, 1, A)
    b = A[:180] + [901, 902]
    start(cache, 2, b)
    # the holder rewrites its tail from inside the shared blocks (a session's next turn after truncate) ...
    a2 = rewrite(cache, 1, A, 40, [600 + i for i in range(100)])
    # ... and so does the sequence that mapped its pages
    b2 = rewrite(cache, 2, b, 70, [700 + i for i in range(50)])
    assert_rows(cache, 1, a2)
    assert_rows(cache, 2, b2)
    physical(cache)
    # a third sequence finds the rows that are still valid, and only those: b2 still starts with A[:70]
    assert start(cache, 3, A[:100] + [5]) == 70
    assert_rows(cache, 3, A[:100] + [5])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_virtual_a_truncated_sequence_refused_its_copies_still_reads(layout):
    """A session truncated into its shared blocks whose try_grow is refused (no budget for the copies) keeps what it
    holds, and a step that only reads it (no new rows) is planned: it writes no page (the property test below
    found a read-only plan raising 'no budget to copy shared pages')."""
    b = A[:150] + [900 + i for i in range(30)]
    probe = virtual(**LAYOUTS[layout])
    start(probe, 1, A)
    start(probe, 2, b)
    full = physical(probe)
    probe.close()
    cache = virtual(limit=full, **LAYOUTS[layout])  # exactly the two sequences: no room for a copy
    start(cache, 1, A)
    assert start(cache, 2, b) == 150
    cache.truncate(2, 40)
    assert not cache.try_grow(2, 41)  # its pages from token 40 on are shared, and copies do not fit
    assert cache.num_tokens(2) == 40
    assert_rows(cache, 2, b[:40])  # plans a read of 0 new tokens from 40
    assert_rows(cache, 1, A)
    physical(cache)


def test_virtual_finished_prefixes_are_kept_reused_and_evicted_under_pressure():
    probe = virtual()
    one = probe.bytes_needed(len(A))
    probe.close()
    cache = virtual(limit=int(1.6 * one))
    start(cache, 1, A)
    cache.free(1)
    kept = physical(cache)
    assert kept == cache.cached_bytes > 0  # the full blocks stay, counted once in the budget
    c = A[:190] + [1]
    assert start(cache, 2, c) == 190  # 5 blocks mapped, 30 rows of the 6th (the cached slot keeps full blocks) copied
    assert_rows(cache, 2, c)
    cache.free(2)
    # an unrelated sequence that needs more than the free budget evicts cached prefixes instead of failing ...
    d = [3000 + i for i in range(200)]
    assert cache.try_allocate_prefix(3, d, len(d)) == 0
    write(cache, 3, d, 0, len(d))
    assert cache.cached_bytes < kept
    physical(cache)
    # ... and one that could not fit even then is refused with nothing changed
    before = (cache.cached_bytes, physical(cache))
    assert cache.try_allocate_prefix(4, A, len(A)) is None
    assert (cache.cached_bytes, physical(cache)) == before
    cache.free(3)
    cache.reclaim_idle(0, 0.0)  # idle past the watermark: every cached page goes back
    assert physical(cache) == cache.cached_bytes == 0


def test_virtual_a_returning_sequence_takes_its_cached_prefix_in_place():
    """A sequence whose tokens start with every full block of a cached prefix (a preempted request placed again, a
    session's next turn) takes the prefix's slot, pages where they are: read from the kernel (smaps), every page of
    the memfd is mapped at one address, as many bytes as the memfd holds. Mapped into a new slot beside the cached
    one, the prefix's pages were mapped twice (and the process's RSS counted them twice) until the prefix went."""
    cache = virtual()
    start(cache, 1, A)
    slot = cache.slot_of(1)
    cache.free(1)
    back = A + [901, 902]
    assert start(cache, 2, back) == len(A) // cache.prefix_block * cache.prefix_block
    assert_rows(cache, 2, back)
    assert memfd_mapped_bytes(cache) == physical(cache) == cache.bytes_needed(len(back))
    assert cache.slot_of(2) == slot and not cache._cached
    # a partial match keeps the cached prefix whole (its later blocks stay cached): mapped beside it, as before
    cache.free(2)
    c = A[:100] + [7] * 20
    assert start(cache, 3, c) == 100  # 3 blocks mapped, 4 rows of the 4th copied
    assert cache.slot_of(3) != slot and slot in cache._cached
    assert_rows(cache, 3, c)
    physical(cache)


def test_virtual_cached_slots_are_recycled_lru_first():
    cache = virtual(max_seqs=2)  # 4 slots: 2 live + 2 more for cached prefixes
    prompts = [[1000 * k + i for i in range(70)] for k in range(6)]
    for k, p in enumerate(prompts):
        start(cache, k, p)
        cache.free(k)
        physical(cache)
    assert len(cache._cached) == cache.num_slots
    assert start(cache, 10, prompts[0] + [1]) == 0  # the oldest was evicted for a slot
    assert start(cache, 11, prompts[5] + [1]) == 64  # the newest is still there
    physical(cache)


def test_virtual_recycled_slots_keep_their_pages_and_never_write_a_shared_one():
    """A finished sequence's slot keeps all its pages (a pool, counted in the budget and in cached_bytes); the
    next sequence that recycles the slot reuses them with no new commit. Where it maps a cached prefix, the
    recycled pages under that prefix make way and the holder's rows stay intact."""
    cache = virtual(max_seqs=1)  # 2 slots: one live, one more for a cached prefix
    populated = []
    real = cache.arena._populate
    cache.arena._populate = lambda lo, hi: (populated.append(hi - lo), real(lo, hi))[1]
    p1, p2, p3 = ([1000 * k + i for i in range(150)] for k in (1, 2, 3))
    for k, p in ((1, p1), (2, p2)):
        start(cache, k, p)
        held = physical(cache)
        cache.free(k)
        assert physical(cache) == held == cache.cached_bytes  # the tail past the full blocks stays too
    both = physical(cache)
    populated.clear()
    assert start(cache, 3, p3) == 0  # recycles p1's slot: its pages are reused, none committed
    assert_rows(cache, 3, p3)
    assert populated == [] and physical(cache) == both
    cache.free(3)
    b = p2[:100] + [7, 8, 9]
    assert start(cache, 4, b) == 100
    assert_rows(cache, 4, b)  # p3's slot recycled under p2's aliased blocks
    assert physical(cache) < both  # the recycled pages under the alias were freed, the rest reused
    cache.free(4)
    assert start(cache, 6, p2[:140] + [1]) == 150 // cache.prefix_block * cache.prefix_block  # its full blocks
    assert_rows(cache, 6, p2[:140] + [1])
    cache.free(6)
    cache.reclaim_idle(0, 0.0)
    assert physical(cache) == cache.cached_bytes == 0


def test_virtual_a_recycled_slot_whose_pages_a_live_sequence_maps_is_emptied_not_reused():
    cache = virtual(max_seqs=2)  # 4 slots
    a, c, d, e = ([1000 * k + i for i in range(70)] for k in range(4))
    for k, p in enumerate((a, c, d, e)):
        start(cache, k, p)
        cache.free(k)
    t = a[:64] + [5, 6, 7]
    assert start(cache, 10, t) == 64  # maps a's cached blocks (a's slot becomes the most recently used)
    for k in (11, 12, 13):  # recycle the other cached slots, then a's, whose pages t maps
        start(cache, k, [50_000 * k + i for i in range(70)])
        assert_rows(cache, 10, t)
        physical(cache)
        cache.free(k)
    assert_rows(cache, 10, t)

def test_virtual_a_cached_prefix_being_matched_gives_up_its_pool_pages_under_pressure():
    """A cached slot keeps the pages past its full blocks (a pool). When a new sequence maps that slot's blocks
    (pinning it) and the budget has no room for the rest, the pool pages are freed, not the new sequence refused
    (the server test with 32 clients and a 96 KiB budget was refused with nothing running)."""
    page_bytes = PAGE * 4  # a page in each of the 4 segments
    cache = virtual(limit=(7 + 5 - 1) * page_bytes)  # A's 7 pages a segment, b's 5 of its own, less A's tail
    assert start(cache, 1, A) == 0 and cache._pages[0] == 7  # 200 tokens: 6 full blocks and a partial one
    cache.free(1)
    assert physical(cache) == cache.cached_bytes == 7 * page_bytes  # the tail is kept too
    b = A[:64] + [900 + i for i in range(150)]
    assert start(cache, 2, b) == 64  # two blocks mapped; five pages of its own need A's tail
    assert_rows(cache, 2, b)
    assert physical(cache) == (6 + 5) * page_bytes  # A kept its six full blocks
    cache.free(2)
    c = A[:192] + [5]
    assert start(cache, 3, c) == 192  # A's full blocks are still matched and intact
    assert_rows(cache, 3, c)
    physical(cache)


def test_virtual_a_request_that_fits_alone_is_placed_though_it_partly_matches_a_cached_prefix():
    """The matched holder is pinned while it is mapped, so its blocks past the match are neither the new
    sequence's nor reclaimable: placed with the match, b does not fit; it is placed without it, the holder evicted."""
    page_bytes = PAGE * 4
    cache = virtual(limit=7 * page_bytes)
    assert start(cache, 1, A) == 0
    cache.free(1)
    b = A[:32] + [900 + i for i in range(150)]  # 182 tokens: 6 pages a segment, one block in common with A
    assert start(cache, 2, b) == 0  # computed from the start: A's slot was the room it needed
    assert_rows(cache, 2, b)
    assert physical(cache) == 6 * page_bytes and cache.cached_bytes == 0


def test_virtual_idle_reclaim_gives_back_pool_pages_before_whole_prefixes():
    page_bytes = PAGE * 4
    cache = virtual()
    b = [600 + i for i in range(200)]
    for k, p in ((1, A), (2, b)):
        start(cache, k, p)
        cache.free(k)
    assert physical(cache) == 14 * page_bytes  # 6 full blocks and a partial one each
    freed = cache.reclaim_idle(12 * page_bytes, 0.0)  # room for both prefixes' full blocks
    assert freed == 2 * page_bytes and physical(cache) == 12 * page_bytes
    c = A[:150] + [1]
    assert start(cache, 3, c) == 150  # A's prefix survived
    assert_rows(cache, 3, c)


def test_virtual_idle_reclaim_of_several_prefixes_is_grouped_and_frees_every_page():
    """Three cached prefixes, one mapping another's blocks: reclaiming them all takes one arena call for the pool
    pages and one for the prefixes (not one each per slot), and the memfd then holds no block; the bytes returned
    are what it held. Under a watermark that keeps one prefix, the oldest goes alone and the newest survives."""
    page_bytes = PAGE * 4  # a page in each of the 4 segments
    cache = virtual()
    b = A[:64] + [900 + i for i in range(100)]  # maps A's first two blocks
    c = [1500 + i for i in range(90)]
    for k, p in ((1, A), (2, b), (3, c)):
        start(cache, k, p)
        cache.free(k)
    assert len(cache._cached) == 3
    held = physical(cache)
    calls = []
    real = cache.arena.decommit_many
    cache.arena.decommit_many = lambda ranges: (calls.append(len(ranges)), real(ranges))[1]
    assert cache.reclaim_idle(0, 0.0) == held
    assert len(calls) == 2
    assert physical(cache) == cache.cached_bytes == 0 and not cache._cached
    for k, p in ((4, A), (5, c)):  # 7 and 3 pages a segment; the watermark keeps c's 2 full blocks
        start(cache, k, p)
        cache.free(k)
    assert cache.reclaim_idle(2 * page_bytes, 0.0) == (7 + 1) * page_bytes
    assert physical(cache) == 2 * page_bytes
    d = c[:64] + [1]
    assert start(cache, 6, d) == 64  # c's prefix survived
    assert_rows(cache, 6, d)


def test_paged_shares_blocks_keeps_an_lru_and_copies_on_write():
    cache = paged()
    bs = cache.block_size
    start(cache, 1, A)
    alone = physical(cache)
    b = A[:150] + [900 + i for i in range(30)]
    assert start(cache, 2, b) == 150 // bs * bs  # full blocks only, as vLLM
    assert physical(cache) - alone == cache.bytes_needed(len(b)) - (150 // bs) * cache.block_bytes
    a2 = rewrite(cache, 1, A, 40, [600 + i for i in range(100)])
    assert_rows(cache, 1, a2)
    assert_rows(cache, 2, b)
    cache.free(1)
    cache.free(2)
    assert physical(cache) == cache.cached_bytes > 0
    assert start(cache, 3, b + [1]) == len(b) // bs * bs  # from cached blocks no sequence holds any more
    assert_rows(cache, 3, b + [1])
    cached = cache.cached_bytes
    assert cache.reclaim() == cached and cache.cached_bytes == 0
    physical(cache)


# ---- deferred reclamation at admission (vAttention) ------------------------------------------------------------
def counting_commits(cache) -> list[int]:
    """Bytes the memfd gained at each page commit the arena makes (st_blocks before and after: the kernel's view)."""
    grown, real = [], cache.arena._populate

    def populate(lo, hi):
        before = cache.arena.allocated_bytes()
        real(lo, hi)
        grown.append(cache.arena.allocated_bytes() - before)

    cache.arena._populate = populate
    return grown


def unrelated(k: int, n: int = 150) -> list[int]:
    return [1000 * k + i for i in range(n)]


def test_virtual_idle_reclaim_leaves_due_prefixes_to_the_sequences_about_to_be_placed():
    """With one sequence about to be placed (keep_slots=1), the idle reclaim evicts the older of two due prefixes
    and keeps the newer one's slot, pages and all; the new sequence takes that slot rather than an empty one, and
    the memfd gains no page for it (its pages are overwritten, not decommitted and committed again)."""
    cache = virtual(max_seqs=2)  # 4 slots: 2 empty once both prefixes are cached
    p1, p2, p3 = unrelated(1), unrelated(2), unrelated(3)
    for k, p in ((1, p1), (2, p2)):
        start(cache, k, p)
        cache.free(k)
    slot2 = next(s for s, r in cache._holder.items() if r.tokens[:5] == p2[:5])
    both = physical(cache)
    grown = counting_commits(cache)
    freed = cache.reclaim_idle(0, 0.0, keep_slots=1)
    assert freed == both // 2 and physical(cache) == both // 2  # p1's slot went back, p2's stayed
    assert start(cache, 3, p3) == 0
    assert cache.slot_of(3) == slot2 and sum(grown) == 0 and physical(cache) == both // 2
    assert_rows(cache, 3, p3)
    cache.free(3)
    assert start(cache, 4, p2[:100] + [1]) == 0  # p2's prefix was the stale one: recycled, it no longer hits
    cache.free(4)
    cache.reclaim_idle(0, 0.0)  # nobody waiting: everything due goes back
    assert physical(cache) == cache.cached_bytes == 0


def test_virtual_only_prefixes_the_idle_reclaim_would_evict_are_recycled():
    """A prefix not idle long enough, or kept by the watermark, is never recycled in place of an empty slot: it
    still hits after the placements. A stale prefix that a placement hits is recent again: the next placement of
    the same step does not recycle it."""
    page_bytes = PAGE * 4  # a page in each of the 4 segments; a block is 32 tokens, one page a segment
    cache = virtual(max_seqs=3)  # 6 slots
    p1, p2, p3 = unrelated(1), unrelated(2), unrelated(3)
    for k, p in ((1, p1), (2, p2), (3, p3)):  # 4 full blocks and a pool page each (150 tokens)
        start(cache, k, p)
        cache.free(k)
    slot = {k: next(s for s, r in cache._holder.items() if r.tokens[:3] == p[:3]) for k, p in ((1, p1), (2, p2), (3, p3))}
    cache._idle_since[slot[1]] -= 100  # p1 and p2 have been idle past 50 s, p3 has not
    cache._idle_since[slot[2]] -= 100
    grown = counting_commits(cache)
    # Without waiting sequences this watermark (p2's full blocks and all of p3) evicts p1 and p2's pool page only.
    cache.reclaim_idle((4 + 5) * page_bytes, 50.0, keep_slots=3)
    assert cache._stale == {slot[1]}  # of three waiting, one slot: the only one the policy would evict
    assert start(cache, 4, unrelated(4)) == 0 and cache.slot_of(4) == slot[1] and sum(grown) == 0
    assert start(cache, 5, unrelated(5)) == 0 and cache.slot_of(5) not in slot.values() and sum(grown) > 0
    assert start(cache, 6, p2[:100] + [1]) == 100  # the watermark's prefix still hits (3 blocks and 4 rows) ...
    cache.free(6)
    assert start(cache, 7, p3[:100] + [1]) == 100  # ... and so does the one not yet due
    for k in (4, 5, 7):
        cache.free(k)
    cache._idle_since[slot[3]] -= 100
    cache.reclaim_idle(0, 50.0, keep_slots=2)
    assert slot[3] in cache._stale
    assert start(cache, 8, p3[:70] + [2]) == 70  # a placement hits the stale prefix ...
    assert start(cache, 9, unrelated(9)) == 0 and cache.slot_of(9) != slot[3]  # ... so the next one leaves it
    for k in (8, 9):
        cache.free(k)
    assert start(cache, 10, p3[:40] + [3]) == 40
    assert_rows(cache, 10, p3[:40] + [3])
    physical(cache)


# ---- property test ------------------------------------------------------------------------------------------
BASES = [A, A[:64] + [800 + i for i in range(100)], [50 + i for i in range(120)]]


class PrefixMachine(RuleBasedStateMachine):
    """Sequences that start from a few shared prompts, grow, get truncated and rewritten, and finish, under a
    budget of about three sequences: every live row stays the one its own tokens give, and the memory held
    is exactly what the counters and the budget say."""

    kind, layout = "virtual", "per-layer"

    def __init__(self) -> None:
        super().__init__()
        probe = virtual(**LAYOUTS[self.layout]) if self.kind == "virtual" else paged()
        limit = 3 * probe.bytes_needed(LAYOUT.max_seq_len)
        probe.close()
        self.cache = virtual(limit, **LAYOUTS[self.layout]) if self.kind == "virtual" else paged(limit, 64)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(base=st.integers(0, len(BASES) - 1), cut=st.integers(1, 200), tail=st.lists(st.integers(0, 40), max_size=20))
    def new(self, base, cut, tail):
        toks = BASES[base][:cut] + tail
        if len(self.tokens) >= 4 or len(toks) < 2:
            return
        cached = self.cache.try_allocate_prefix(self.next_id, toks, len(toks))
        if cached is not None:
            assert cached < len(toks)
            write(self.cache, self.next_id, toks, cached, len(toks) - cached)
            self.tokens[self.next_id] = toks
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 40))
    def grow(self, data, n):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[sid]
        n = min(n, LAYOUT.max_seq_len - len(toks))
        if n and self.cache.try_grow(sid, len(toks) + n):
            toks.extend(data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n)))
            write(self.cache, sid, toks, len(toks) - n, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), keep=st.integers(0, 255), n=st.integers(1, 40))
    def rewrite(self, data, keep, n):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[sid]
        keep = min(keep, len(toks))
        self.cache.truncate(sid, keep)
        del toks[keep:]
        n = min(n, LAYOUT.max_seq_len - keep)
        if n and self.cache.try_grow(sid, keep + n):
            toks.extend(data.draw(st.lists(st.integers(41, 80), min_size=n, max_size=n)))
            write(self.cache, sid, toks, keep, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.free(sid)
        del self.tokens[sid]

    @rule()
    def reclaim_some(self):
        self.cache.reclaim(PAGE)

    @rule(keep=st.integers(0, 3), watermark_pages=st.sampled_from([0, 4, 12]))
    def reclaim_idle_for_waiting(self, keep, watermark_pages):
        # the engine's idle reclaim with `keep` sequences waiting: due slots stay stale for the next placements
        self.cache.reclaim_idle(watermark_pages * PAGE, 0.0, keep_slots=keep)

    @invariant()
    def rows_and_memory_are_exact(self):
        for sid, toks in self.tokens.items():
            assert self.cache.num_tokens(sid) == len(toks)
            assert_rows(self.cache, sid, toks)
        held = physical(self.cache)
        assert held <= self.cache.budget.limit_bytes

    def teardown(self):
        for sid in list(self.tokens):
            self.cache.free(sid)
        self.cache.reclaim()
        assert physical(self.cache) == 0
        self.cache.close()


PROPS = settings(max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _machine(name: str, **attrs):
    machine = type(name, (PrefixMachine,), attrs)
    test = machine.TestCase
    test.settings = PROPS
    return test


TestVirtualPerLayer = _machine("VirtualPerLayer")
TestVirtualHeadMajor = _machine("VirtualHeadMajor", layout="head-major")
TestVirtualTokenMajor = _machine("VirtualTokenMajor", layout="token-major")
TestPaged = _machine("Paged", kind="paged")
