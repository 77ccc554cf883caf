"""Property tests (hypothesis state machine) of preemption by swapping: the real scheduler (priority policy, swap
mode), a real KV cache (virtual, paged) and the real host tier, driven by random arrivals, priority changes, steps
and aborts, with a stand-in runner that writes K/V values unique to (sequence, position, layer).

Checked after every rule, against the test's own model rather than the components' counters: every byte the host
tier's budget holds belongs to a sequence that is swapped out (its K/V for exactly the tokens it had computed, in
the cache's own rounding), never more than the tier's limit; the KV budget is never exceeded; every running
sequence's cache holds exactly the values written for its positions (a swap that lost or mixed up data shows
here); and once everything is aborted, nothing is left in either tier.

With cross-turn reuse (`reuse`: host copies kept after a swap-in, later swap-outs moving only new tokens, finished
turns of sessions evicted to the host tier): the host tier's budget equals the bytes of the buffers it holds (their
sizes, not its counters), every kept copy belongs to a live sequence or a session, and the running sequences'
values (above) show that a copy assembled from several swap-outs restores exactly.

With swap threads, swap-outs run on the pool overlapped with the step: until the copy lands, the sequence still
holds its device KV, unchanged, and its host bytes are already reserved, so both are counted and neither budget
is exceeded.

With the host region (`region`: the engine's default on a CPU, memory/host_region.py) the tier's budget also holds
the region's warm free pages and page rounding, and its tables: there every byte of the budget beyond the held
buffers is checked against the pages the kernel holds for the region (mincore) plus its tables (no fewer bytes than
sys.getsizeof finds in them), and the buffers' own sizes against the tier's owner. A swap-out at the tier's
high-water mark borrows the reservation of warm pages (host_region.py): the same equalities hold after it."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.policy import PolicyConfig
from memfit.llm.engine.request import Sequence
from memfit.llm.engine.scheduler import Scheduler, SchedulerConfig
from memfit.llm.kv.base import SeqStep
from memfit.llm.kv.paged import PagedKVCache
from memfit.llm.kv.swap import SwapSpace
from memfit.llm.kv.swap_model import OWNER
from memfit.llm.kv.virtual import VirtualKVCache
from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE
from tests.llm.kv.test_virtual import LAYOUT, kv_for
from tests.memory.test_host_region import resident_bytes

STATEFUL = settings(max_examples=30, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class SwapMachine(RuleBasedStateMachine):
    kind = "virtual"
    threads = 0
    reuse = False
    ssd = False  # an SSD tier below the host tier (room for ~48 tokens): its budget equals the extents in use
    groups = False  # paged: the block-group allocator, whose swaps copy runs of blocks
    region = False  # the host tier's buffers from a HostRegion that keeps freed pages warm (keep_bytes None)
    host_tokens = 32  # the host tier's room, in tokens of KV

    def __init__(self) -> None:
        super().__init__()
        segs = 2 * LAYOUT.num_layers
        # Room for 64 tokens of KV (1-3 sequences); a host tier for 32, so some swaps fall back to recomputation.
        limit = segs * 8 * PAGE if self.kind == "virtual" else 16 * 4 * LAYOUT.bytes_per_token
        self.kv_budget = MemoryBudget(limit, name="kv_budget")
        self.cache = (VirtualKVCache(LAYOUT, self.kv_budget, max_seqs=4, prefault=False, eager_pages=0)
                      if self.kind == "virtual" else PagedKVCache(LAYOUT, self.kv_budget, block_size=4, num_blocks=20,
                                                                 block_groups=self.groups))
        self.host = MemoryBudget(self.host_tokens * LAYOUT.bytes_per_token, Tier.HOST, name="swap_space")
        self.ssd_tier = None
        if self.ssd:
            import tempfile

            from memfit.llm.kv.swap_ssd import SSDTier

            self.tmp = tempfile.TemporaryDirectory()
            self.ssd_tier = SSDTier(self.tmp.name, 48 * LAYOUT.bytes_per_token)
        self.swap = SwapSpace(self.cache, self.host, threads=self.threads, reuse=self.reuse, ssd=self.ssd_tier,
                              region=self.region)
        cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, policy=PolicyConfig("priority", aging_steps=3),
                              preemption_mode="swap")
        self.sched = Scheduler(cfg, self.cache, self.swap)
        self.seqs: dict[str, Sequence] = {}
        self.n = 0

    @rule(prompt_len=st.integers(4, 30), max_tokens=st.integers(1, 30), priority=st.integers(-2, 3),
          session=st.sampled_from([None, "a", "b"]))
    def add(self, prompt_len: int, max_tokens: int, priority: int, session: str | None) -> None:
        seq = Sequence(f"r{self.n}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                       priority=priority, session_id=session)
        self.n += 1
        self.seqs[seq.request_id] = seq
        self.sched.add(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), priority=st.integers(-2, 3))
    def change_priority(self, data, priority: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.sched.set_priority(self.seqs[rid], priority)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.sched.abort(self.seqs.pop(rid))

    @rule(session=st.sampled_from(["a", "b"]))
    def end_session(self, session: str) -> None:
        self.sched.drop_retained(session)

    @rule(times=st.integers(1, 4))
    def step(self, times: int) -> None:
        for _ in range(times):
            self._step()

    def _step(self) -> None:
        # Let in-flight swap-ins land first: whether one is ready at a step must not depend on thread timing, since
        # hypothesis replays a run and needs it to reach the same states (swap-outs land at schedule() anyway).
        for entry in list(self.swap._inflight.values()):
            entry[2].exception()
        out = self.sched.schedule()
        if not out.scheduled:
            return
        steps = [SeqStep(i.seq.seq_id, i.seq.num_computed, i.num_new) for i in out.scheduled]
        plan = self.cache.plan_step(steps)
        for layer in range(LAYOUT.num_layers):
            k = torch.cat([kv_for(s.seq_id, s.start, s.num_new, layer)[0] for s in steps])
            self.cache.write(layer, plan, k, -k)
        for item in out.scheduled:
            seq, samples = item.seq, item.samples
            seq.num_computed += item.num_new
            if samples:
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
                    self.seqs.pop(seq.request_id)

    # ---- invariants --------------------------------------------------------------------------------------
    @invariant()
    def host_tier_holds_exactly_the_swapped_out_kv(self) -> None:
        if self.reuse or self.ssd:
            return  # kept copies are held too: the invariant above
        expected = sum(self.swap.runs_shape(s.num_computed)[0] for s in self.seqs.values() if s.swapped)
        assert self.host.by_owner().get(OWNER, 0) == expected
        assert self.host.peak_bytes <= self.host.limit_bytes
        assert self.kv_budget.peak_bytes <= self.kv_budget.limit_bytes

    @invariant()
    def host_budget_equals_the_buffers_held_and_kept_copies_belong_to_someone(self) -> None:
        assert self.host.by_owner().get(OWNER, 0) == self.swap.held_bytes()
        assert self.host.used_bytes == self._region_bytes() + self.swap.held_bytes() <= self.host.limit_bytes
        if self.ssd_tier is not None:
            store = self.ssd_tier.store
            in_use = store.capacity - sum(n for _, n in store.free_extents)  # from the allocator's free list
            assert self.ssd_tier.budget.used_bytes == in_use <= self.ssd_tier.budget.limit_bytes
        owners = {s.seq_id for s in self.seqs.values()} | {s.seq_id for s in self.sched.retained.values()} | \
                 {s.seq_id for s in self.sched.swapped_sessions.values()}
        assert set(self.swap._copies) <= owners
        for seq in self.seqs.values():
            if seq.swapped and not seq.swapping_in:
                assert self.swap.valid_tokens(seq.seq_id) == seq.num_computed

    @invariant()
    def swapped_sequences_hold_no_kv_and_running_ones_hold_their_tokens(self) -> None:
        for seq in self.seqs.values():
            if seq.swapped and not (seq.swapping_in or seq.swapping_out):
                assert not self.cache.has_seq(seq.seq_id) and seq.num_computed > 0
        for seq in self.sched.running:
            assert self.cache.num_tokens(seq.seq_id) == seq.num_computed

    @invariant()
    def a_sequence_swapping_out_keeps_its_kv_intact_until_the_copy_lands(self) -> None:
        """Its device KV is still allocated (so counted in the KV budget, checked above), nobody wrote over it, and
        its host copy is already reserved: both copies are counted while the copy runs, never one of them freed."""
        flying = [s for s in self.seqs.values() if s.swapping_out]
        assert {s.seq_id for s in flying} == set(self.swap._outflight)
        assert all(s in self.sched.waiting and s.swapped for s in flying)
        assert self.kv_budget.used_bytes <= self.kv_budget.limit_bytes
        for seq in flying:
            assert self.cache.has_seq(seq.seq_id) and self.swap.holds(seq.seq_id)
            self._assert_holds_its_values(seq)

    @invariant()
    def running_sequences_read_back_what_was_written(self) -> None:
        for seq in self.sched.running:
            self._assert_holds_its_values(seq)

    def _region_bytes(self) -> int:
        """What the tier's budget must hold beyond its buffers' sizes: the pages the kernel holds for the region less
        the bytes of the held buffers inside it (from the buffers' addresses, not the region's count), and its tables
        (checked against sys.getsizeof); 0 without."""
        from tests.memory.test_host_region import table_sizes

        region = self.swap.region
        if region is None:
            return 0
        assert table_sizes(region) <= region.meta_bytes
        lo, hi = region.arena.address, region.arena.address + region.arena.size
        held = [*(c for copy in self.swap._copies.values() for c in copy.chunks),
                *(c for r in self.swap.book.retiring.values() for c in r)]
        inside = sum(c.buf.numel() for c in held if c.buf is not None and lo <= c.buf.data_ptr() < hi)
        return region.meta_bytes + resident_bytes(region) - inside

    def _assert_holds_its_values(self, seq: Sequence) -> None:
        n = seq.num_computed
        if n == 0:
            return
        plan = self.cache.plan_step([SeqStep(seq.seq_id, n, 0)])
        for layer in range(LAYOUT.num_layers):
            k, v = self.cache.context(layer, plan, 0)
            want = kv_for(seq.seq_id, 0, n, layer)[0]
            assert torch.equal(k, want) and torch.equal(v, -want)

    def teardown(self) -> None:
        for seq in list(self.seqs.values()):
            self.sched.abort(seq)
        for session in ("a", "b"):
            self.sched.drop_retained(session)
        assert self.host.by_owner().get(OWNER, 0) == 0 and self.cache.stats().num_seqs == 0
        assert self.host.used_bytes == self._region_bytes()  # warm free pages only
        if self.ssd_tier is not None:
            assert self.ssd_tier.budget.used_bytes == 0
        self.swap.trim()
        meta = self.swap.region.meta_bytes if self.swap.region is not None else 0
        assert self.host.used_bytes == meta == self._region_bytes()  # the region's tables only
        self.swap.close()
        assert self.host.used_bytes == 0  # the tables too
        self.cache.close()
        if self.ssd:
            self.tmp.cleanup()
        assert self.kv_budget.used_bytes == 0  # the virtual cache gives its idle pages back on close


class PagedSwapMachine(SwapMachine):
    kind = "paged"


class AsyncVirtualSwapMachine(SwapMachine):  # swap-ins and swap-outs on the pool, overlapped with steps
    threads = 2


class AsyncPagedSwapMachine(SwapMachine):
    kind = "paged"
    threads = 2


class ReuseVirtualSwapMachine(SwapMachine):
    reuse = True


class ReusePagedSwapMachine(SwapMachine):
    kind = "paged"
    reuse = True


class ReuseAsyncPagedGroupsSwapMachine(SwapMachine):
    kind = "paged"
    threads = 2
    reuse = True
    groups = True


class SSDPagedGroupsSwapMachine(SwapMachine):
    kind = "paged"
    ssd = True
    groups = True


class ReuseAsyncVirtualSwapMachine(SwapMachine):
    threads = 2
    reuse = True


class SSDReuseVirtualSwapMachine(SwapMachine):
    reuse = True
    ssd = True


class SSDAsyncPagedSwapMachine(SwapMachine):
    kind = "paged"
    threads = 2
    ssd = True


class RegionReuseAsyncVirtualSwapMachine(SwapMachine):  # the engine's host tier on a CPU
    threads = 2
    reuse = True
    region = True


class RegionSSDPagedSwapMachine(SwapMachine):
    kind = "paged"
    ssd = True
    region = True


class RegionReuseVirtualFullSwapMachine(SwapMachine):
    """A tier that holds kept copies until it is full: its swap-outs then borrow warm pages' reservation."""
    reuse = True
    region = True
    host_tokens = 56


TestVirtualSwap = SwapMachine.TestCase
TestVirtualSwap.settings = STATEFUL
TestPagedSwap = PagedSwapMachine.TestCase
TestPagedSwap.settings = STATEFUL
TestAsyncVirtualSwap = AsyncVirtualSwapMachine.TestCase
TestAsyncVirtualSwap.settings = STATEFUL
TestAsyncPagedSwap = AsyncPagedSwapMachine.TestCase
TestAsyncPagedSwap.settings = STATEFUL
TestReuseVirtualSwap = ReuseVirtualSwapMachine.TestCase
TestReuseVirtualSwap.settings = STATEFUL
TestReusePagedSwap = ReusePagedSwapMachine.TestCase
TestReusePagedSwap.settings = STATEFUL
TestReuseAsyncVirtualSwap = ReuseAsyncVirtualSwapMachine.TestCase
TestReuseAsyncVirtualSwap.settings = STATEFUL
TestSSDReuseVirtualSwap = SSDReuseVirtualSwapMachine.TestCase
TestSSDReuseVirtualSwap.settings = STATEFUL
TestSSDAsyncPagedSwap = SSDAsyncPagedSwapMachine.TestCase
TestSSDAsyncPagedSwap.settings = STATEFUL
TestReuseAsyncPagedGroupsSwap = ReuseAsyncPagedGroupsSwapMachine.TestCase
TestReuseAsyncPagedGroupsSwap.settings = STATEFUL
TestSSDPagedGroupsSwap = SSDPagedGroupsSwapMachine.TestCase
TestSSDPagedGroupsSwap.settings = STATEFUL
TestRegionReuseAsyncVirtualSwap = RegionReuseAsyncVirtualSwapMachine.TestCase
TestRegionReuseAsyncVirtualSwap.settings = STATEFUL
TestRegionSSDPagedSwap = RegionSSDPagedSwapMachine.TestCase
TestRegionSSDPagedSwap.settings = STATEFUL
TestRegionReuseVirtualFullSwap = RegionReuseVirtualFullSwapMachine.TestCase
TestRegionReuseVirtualFullSwap.settings = STATEFUL
