"""Property-based tests (hypothesis) of both KV caches: random try_allocate / try_grow / write / free /
reclaim sequences never leak committed memory, never mix up sequences, keep accounting exact and stay
inside the budget; and the two caches return identical contexts for identical writes.

The memory claims are checked against measures the caches do not keep themselves: for the virtual cache,
the pages the kernel holds in its arena (/proc/self/pagemap), and the test's own record of what was asked
and written; for the paged cache, the block tables against the pool and the budget ledger."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memfit.llm.kv.base import SeqStep
from memfit.llm.kv.paged import PagedKVCache
from memfit.llm.kv.virtual import VirtualKVCache
from memfit.memory.budget import MemoryBudget
from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE
from tests.llm.kv.kernel_pages import arena_pages, assert_paged_tables_consistent
from tests.llm.kv.test_virtual import LAYOUT, kv_for
from tests.memory.test_vmem import vma_rss

MAXLEN = LAYOUT.max_seq_len
SEGS = 2 * LAYOUT.num_layers
STATEFUL = settings(max_examples=40, stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def build(kind: str, budget: MemoryBudget, **kw):
    if kind == "virtual":
        return VirtualKVCache(LAYOUT, budget, max_seqs=kw.get("max_seqs", 4), eager_pages=kw.get("eager", 1),
                              prefault=kw.get("prefault", False), token_major=kw.get("token_major", False),
                              head_major=kw.get("head_major", False))
    return PagedKVCache(LAYOUT, budget, block_size=4, num_blocks=kw.get("num_blocks", 40),
                        block_groups=kw.get("groups", False))


class KVMachine(RuleBasedStateMachine):
    """One cache under a tight budget (about 1.5 full-length sequences), driven at random."""

    kind = "virtual"
    prefault = False
    token_major = False
    head_major = False
    groups = False  # paged: the block-group allocator (memory/blocks.py)

    def __init__(self) -> None:
        super().__init__()
        segs = SEGS * (LAYOUT.num_kv_heads if self.head_major else 1)
        limit = segs * 12 * PAGE if self.kind == "virtual" else 24 * 4 * LAYOUT.bytes_per_token
        self.budget = MemoryBudget(limit, name="kv_budget")
        self.cache = build(self.kind, self.budget, prefault=self.prefault, token_major=self.token_major,
                           head_major=self.head_major, groups=self.groups)
        self.written: dict[int, int] = {}  # the model: tokens written per live sequence
        self.requested: dict[int, int] = {}  # the model: largest capacity granted per live sequence
        self.next_id = 0
        self.peak_resident = 0  # most bytes the kernel held in the arena at any check
        self.rss0 = vma_rss(self.cache.arena.address) if self.kind == "virtual" else None

    def snapshot(self):
        self.cache.sync()
        caps = {s: self.cache.capacity(s) for s in self.written}
        return caps, self.cache.stats(), self.budget.used_bytes

    @rule(n=st.integers(0, MAXLEN))
    def allocate(self, n: int) -> None:
        sid, self.next_id = self.next_id, self.next_id + 1
        before = self.snapshot()
        if self.cache.try_allocate(sid, n):
            self.written[sid], self.requested[sid] = 0, n
            assert self.cache.capacity(sid) >= n
        else:
            assert not self.cache.has_seq(sid)
            assert self.snapshot() == before

    @precondition(lambda self: self.written)
    @rule(data=st.data())
    def grow(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.written)))
        n = data.draw(st.integers(0, MAXLEN))
        before = self.snapshot()
        if self.cache.try_grow(sid, n):
            self.requested[sid] = max(self.requested[sid], n)
            assert self.cache.capacity(sid) >= n
        else:
            assert self.snapshot() == before

    @precondition(lambda self: self.written)
    @rule(data=st.data())
    def step(self, data) -> None:
        """Append 1..9 tokens to a random subset of sequences (decode and prefill chunks mixed)."""
        sids = data.draw(st.permutations(sorted(self.written)))
        sids = sids[: data.draw(st.integers(1, len(sids)))]
        steps = []
        for sid in sids:
            start = self.written[sid]
            n = min(data.draw(st.integers(1, 9)), MAXLEN - start)
            if n <= 0:
                continue
            if self.cache.capacity(sid) < start + n:
                if not self.cache.try_grow(sid, start + n):
                    continue
                self.requested[sid] = max(self.requested[sid], start + n)
            steps.append(SeqStep(sid, start, n))
        if not steps:
            return
        plan = self.cache.plan_step(steps)
        for layer in range(LAYOUT.num_layers):
            k = torch.cat([kv_for(s.seq_id, s.start, s.num_new, layer)[0] for s in steps])
            self.cache.write(layer, plan, k, -k)
        for s in steps:
            self.written[s.seq_id] = s.end

    @precondition(lambda self: self.written)
    @rule(data=st.data())
    def free(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.written)))
        self.cache.free(sid)
        del self.written[sid], self.requested[sid]
        assert not self.cache.has_seq(sid)

    @rule()
    def reclaim(self) -> None:
        self.cache.sync()
        self.cache.reclaim()

    @invariant()
    def accounting_is_exact(self) -> None:
        self.cache.sync()
        s = self.cache.stats()
        assert self.budget.used_bytes == s.committed_bytes
        assert s.tokens_held == sum(self.written.values()) and s.num_seqs == len(self.written)
        assert s.used_bytes == s.tokens_held * LAYOUT.bytes_per_token
        for sid, n in self.written.items():
            assert self.cache.num_tokens(sid) == n <= self.cache.capacity(sid)

    @invariant()
    def memory_is_what_the_kernel_holds(self) -> None:
        """The manager's claims against an independent measure: the kernel's page map of the arena
        (virtual), the block tables against the pool (paged)."""
        self.cache.sync()
        if self.kind == "paged":
            held = assert_paged_tables_consistent(self.cache, list(self.written))
            assert held == self.cache.stats().committed_bytes <= self.budget.limit_bytes
            for sid, n in self.written.items():
                assert len(self.cache.block_table(sid)) * 4 >= n  # block_size 4: the written tokens have blocks
            return
        pages = arena_pages(self.cache)  # (slots, segments, seg_pages) bool, from /proc/self/pagemap
        resident = int(pages.sum()) * PAGE
        assert resident == self.cache.stats().committed_bytes  # what the kernel holds is what it claims
        self.peak_resident = max(self.peak_resident, resident)
        assert self.peak_resident <= self.budget.limit_bytes  # exact on the CPU: 4 KiB pages, no THP
        row = LAYOUT.bytes_per_token // self.cache.num_segments  # bytes per token per segment, in every layout
        eager = 1  # build(): eager_pages=1
        for sid, n in self.written.items():
            slot = pages[self.cache.slot_of(sid)]  # (segments, seg_pages)
            assert slot[:, : -(-n * row // PAGE)].all()  # every written token sits on a page of its own
            # Waste: at most one partly filled page per segment, the eager pages, and capacity asked for
            # but not yet written: from the test's own record of what it asked and wrote.
            waste = int(slot.sum()) * PAGE - n * LAYOUT.bytes_per_token
            bound = slot.shape[0] * ((max(self.requested[sid], n) - n) * row + (1 + eager) * PAGE)
            assert 0 <= waste <= bound, (sid, waste, bound)

    @invariant()
    def sequences_never_overlap(self) -> None:
        if not self.written:
            return
        order = sorted(self.written, key=lambda s: self.cache.slot_of(s) if self.cache.fixed_stride else s)
        plan = self.cache.plan_step([SeqStep(s, self.written[s], 0) for s in order])  # read-only step
        for layer in range(LAYOUT.num_layers):
            kb, vb = self.cache.context_batch(layer, plan)
            for i, sid in enumerate(order):
                n = self.written[sid]
                ek, ev = kv_for(sid, 0, n, layer)
                k, v = self.cache.context(layer, plan, i)
                assert torch.equal(k, ek) and torch.equal(v, ev)
                assert torch.equal(kb[i, :n], ek) and torch.equal(vb[i, :n], ev)

    def teardown(self) -> None:
        for sid in list(self.written):
            self.cache.free(sid)
        self.cache.sync()
        self.cache.reclaim()
        assert self.cache.stats().committed_bytes == 0 == self.budget.used_bytes
        if self.rss0 is not None:
            assert vma_rss(self.cache.arena.address) == self.rss0  # no physical page leaked
        self.cache.close()


class VirtualMachine(KVMachine):
    kind = "virtual"


class VirtualPrefaultMachine(KVMachine):
    kind = "virtual"
    prefault = True


class VirtualTokenMajorMachine(KVMachine):
    kind = "virtual"
    token_major = True


class VirtualHeadMajorMachine(KVMachine):
    kind = "virtual"
    head_major = True


class PagedMachine(KVMachine):
    kind = "paged"


class PagedGroupsMachine(KVMachine):
    kind = "paged"
    groups = True


TestVirtualKV = VirtualMachine.TestCase
TestVirtualKV.settings = STATEFUL
TestVirtualPrefaultKV = VirtualPrefaultMachine.TestCase
TestVirtualPrefaultKV.settings = settings(STATEFUL, max_examples=15)
TestVirtualTokenMajorKV = VirtualTokenMajorMachine.TestCase
TestVirtualTokenMajorKV.settings = settings(STATEFUL, max_examples=20)
TestVirtualHeadMajorKV = VirtualHeadMajorMachine.TestCase
TestVirtualHeadMajorKV.settings = settings(STATEFUL, max_examples=20)
TestPagedKV = PagedMachine.TestCase
TestPagedKV.settings = STATEFUL
TestPagedGroupsKV = PagedGroupsMachine.TestCase
TestPagedGroupsKV.settings = STATEFUL


# A step: for each of up to 3 sequences slots, (new tokens) or None to free it.
ops = st.lists(st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=3, max_size=3), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(ops=ops, seed=st.integers(0, 2**16))
def test_virtual_and_paged_return_identical_contexts(ops, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    caches = [build("virtual", MemoryBudget(2**24), eager=0), build("paged", MemoryBudget(2**24), num_blocks=64),
              build("virtual", MemoryBudget(2**24), eager=0, token_major=True),
              build("virtual", MemoryBudget(2**24), eager=0, head_major=True),
              build("paged", MemoryBudget(2**24), num_blocks=64, groups=True)]
    lens: dict[int, int] = {}
    next_id = 0
    live = [None, None, None]  # seq id per position
    for row in ops:
        steps = []
        for j, n in enumerate(row):
            if n is None:
                if live[j] is not None:
                    for c in caches:
                        c.free(live[j])
                    lens.pop(live[j])
                    live[j] = None
                continue
            if live[j] is None:
                live[j], next_id = next_id, next_id + 1
                lens[live[j]] = 0
                for c in caches:
                    assert c.try_allocate(live[j], 0)
            sid = live[j]
            n = min(n, MAXLEN - lens[sid])
            if n == 0:
                continue
            for c in caches:
                assert c.try_grow(sid, lens[sid] + n)
            steps.append(SeqStep(sid, lens[sid], n))
            lens[sid] += n
        if not steps:
            continue
        total = sum(s.num_new for s in steps)
        plans = [c.plan_step(steps) for c in caches]
        for layer in range(LAYOUT.num_layers):
            k = torch.randn(total, 2, 64, generator=gen)
            v = torch.randn(total, 2, 64, generator=gen)
            outs = []
            for c, p in zip(caches, plans):
                c.write(layer, p, k, v)
                kb, vb = c.context_batch(layer, p)
                ctx = [c.context(layer, p, i) for i in range(len(steps))]
                outs.append((kb, vb, ctx))
            (kb0, vb0, ctx0) = outs[0]
            for kb1, vb1, ctx1 in outs[1:]:
                for i, s in enumerate(steps):
                    assert torch.equal(ctx0[i][0], ctx1[i][0]) and torch.equal(ctx0[i][1], ctx1[i][1])
                    assert torch.equal(kb0[i, : s.end], kb1[i, : s.end]) and torch.equal(vb0[i, : s.end], vb1[i, : s.end])
                    assert ctx0[i][0].shape == (s.end, 2, 64)
        # Writing later layers left earlier ones intact (token-major rows interleave the layers).
        for layer in range(LAYOUT.num_layers):
            ref = [caches[0].context(layer, plans[0], i) for i in range(len(steps))]
            for c, p in zip(caches[1:], plans[1:]):
                for i in range(len(steps)):
                    got = c.context(layer, p, i)
                    assert torch.equal(got[0], ref[i][0]) and torch.equal(got[1], ref[i][1])
    for c in caches:
        c.close()
