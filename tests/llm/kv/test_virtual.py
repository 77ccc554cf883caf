"""VirtualKVCache (vAttention): contiguous views, page-granular commits, deferred reclamation, budget."""
import pytest
import torch

from memfit.llm.kernels.attention import attend_one
from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVCacheError, KVLayout, SeqStep
from memfit.llm.kv.virtual import VirtualKVCache
from memfit.memory.budget import MemoryBudget
from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE
from tests.llm.kv.kernel_pages import arena_resident_bytes
from tests.memory.test_vmem import vma_rss

# row = Hkv x D x 4 B = 512 B: 8 tokens per 4 KiB page; 64 tokens = 8 pages per (layer, K|V) segment
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_seq_len=64)
SEG_PAGES = 8
SEGS = 2 * LAYOUT.num_layers


def make(limit=2**22, **kw) -> tuple[VirtualKVCache, MemoryBudget]:
    budget = MemoryBudget(limit, name="kv_budget")
    kw.setdefault("prefault", False)
    kw.setdefault("eager_pages", 0)
    return VirtualKVCache(LAYOUT, budget, max_seqs=kw.pop("max_seqs", 4), **kw), budget


def kv_for(seq_id: int, start: int, n: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(start, start + n, dtype=torch.float32)
    k = (seq_id * 1000 + pos + layer * 0.25).view(n, 1, 1).expand(n, 2, 64).contiguous()
    return k, -k


def write(cache, steps):
    plan = cache.plan_step(steps)
    k = torch.cat([kv_for(s.seq_id, s.start, s.num_new, 0)[0] for s in steps])
    for layer in range(LAYOUT.num_layers):
        k = torch.cat([kv_for(s.seq_id, s.start, s.num_new, layer)[0] for s in steps])
        cache.write(layer, plan, k, -k)
    return plan


def test_layout_and_pages_per_segment():
    cache, budget = make()
    assert cache.row_bytes == 512 and cache.seg_pages == SEG_PAGES and cache.page == PAGE
    assert cache.try_allocate(1, 10)  # 10 tokens -> 2 pages in each of the 4 segments
    assert cache.capacity(1) == 16
    assert cache.stats().committed_bytes == SEGS * 2 * PAGE == budget.by_owner()["kv"]
    base = vma_rss(cache.arena.address)
    assert cache.try_grow(1, 16)  # still inside the 2 pages
    assert cache.stats().committed_bytes == SEGS * 2 * PAGE
    assert cache.try_grow(1, 17)
    assert cache.capacity(1) == 24 and cache.stats().committed_bytes == SEGS * 3 * PAGE
    assert vma_rss(cache.arena.address) - base == SEGS * PAGE  # physical memory follows exactly
    cache.close()
    assert budget.used_bytes == 0


def test_context_is_a_view_and_batch_view_when_slots_are_consecutive():
    cache, _ = make()
    for sid, n in [(1, 5), (2, 20), (3, 9)]:
        assert cache.try_allocate(sid, n)
    assert [cache.slot_of(s) for s in (1, 2, 3)] == [0, 1, 2]
    plan = write(cache, [SeqStep(1, 0, 5), SeqStep(2, 0, 20), SeqStep(3, 0, 9)])
    for layer in range(LAYOUT.num_layers):
        for i, (sid, n) in enumerate([(1, 5), (2, 20), (3, 9)]):
            k, v = cache.context(layer, plan, i)
            ek, ev = kv_for(sid, 0, n, layer)
            assert torch.equal(k, ek) and torch.equal(v, ev)
            assert k.untyped_storage().data_ptr() == cache.arena.address  # a view into the arena
        kb, vb = cache.context_batch(layer, plan)
        assert kb.shape == (3, 20, 2, 64)
        assert kb.untyped_storage().data_ptr() == cache.arena.address  # consecutive slots: no copy
        for i, (sid, n) in enumerate([(1, 5), (2, 20), (3, 9)]):
            assert torch.equal(kb[i, :n], kv_for(sid, 0, n, layer)[0])
            assert torch.equal(vb[i, :n], kv_for(sid, 0, n, layer)[1])
    # decode step with slots out of order: a gather, same values
    for sid in (1, 2, 3):
        assert cache.try_grow(sid, cache.num_tokens(sid) + 1)
    plan = write(cache, [SeqStep(3, 9, 1), SeqStep(1, 5, 1)])
    assert not plan.consecutive
    kb, _ = cache.context_batch(1, plan)
    assert kb.untyped_storage().data_ptr() != cache.arena.address
    assert torch.equal(kb[0, :10], kv_for(3, 0, 10, 1)[0]) and torch.equal(kb[1, :6], kv_for(1, 0, 6, 1)[0])
    assert cache.num_tokens(1) == 6 and cache.num_tokens(2) == 20 and cache.num_tokens(3) == 10
    cache.close()


def test_batched_decode_attention_matches_per_sequence():
    torch.manual_seed(0)
    cache, _ = make()
    lens = [7, 30, 12]
    for sid, n in enumerate(lens):
        assert cache.try_allocate(sid, n + 1)
    plan = cache.plan_step([SeqStep(s, 0, n + 1) for s, n in enumerate(lens)])
    k, v = torch.randn(sum(lens) + 3, 2, 64), torch.randn(sum(lens) + 3, 2, 64)
    cache.write(0, plan, k, v)
    q = torch.randn(3, 4, 64)  # one decode query per sequence, Hq=4 (GQA over Hkv=2)
    kb, vb = cache.context_batch(0, plan)  # (B, Lmax, Hkv, D)
    ends = torch.tensor(plan.ends)
    mask = (torch.arange(kb.shape[1]) < ends[:, None])[:, None, None, :]  # (B, 1, 1, Lmax)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )[:, :, 0]
    for i in range(3):
        ck, cv = cache.context(0, plan, i)
        ref = attend_one(q[i : i + 1], ck, cv, scale=64**-0.5)[0]
        torch.testing.assert_close(out[i], ref)
    cache.close()


def test_padded_batch_reads_commit_nothing():
    cache, _ = make()
    assert cache.try_allocate(1, 2)
    assert cache.try_allocate(2, 60)
    plan = write(cache, [SeqStep(1, 0, 2), SeqStep(2, 0, 60)])
    rss = vma_rss(cache.arena.address)
    kb, _ = cache.context_batch(0, plan)
    _ = float(kb.sum())  # row 0 reads 58 positions past its single page
    assert vma_rss(cache.arena.address) == rss
    cache.close()


def test_deferred_reclamation_reuses_idle_slots():
    cache, budget = make(limit=SEGS * 10 * PAGE, max_seqs=3)
    assert cache.try_allocate(1, 40)  # 5 pages per segment
    assert cache.try_allocate(2, 30)  # 4 pages
    cache.free(1)
    assert cache.stats().committed_bytes == SEGS * 9 * PAGE  # the pages stay with the idle slot
    assert cache.idle_bytes == SEGS * 5 * PAGE
    assert cache.try_allocate(3, 20)  # reuses slot 0 (best fit); surplus beyond need is trimmed
    assert cache.slot_of(3) == 0 and cache.idle_bytes == 0
    assert cache.stats().committed_bytes == SEGS * (3 + 4) * PAGE
    cache.free(3)
    cache.free(2)  # idle: slot 0 (3 pages), slot 1 (4 pages); budget 10 pages/segment
    assert cache.try_allocate(4, 64)  # needs 8 pages: only fits by reclaiming the other idle slot
    assert cache.slot_of(4) == 1
    assert cache.stats().committed_bytes == SEGS * 8 * PAGE == budget.used_bytes
    assert cache.idle_bytes == 0
    cache.free(4)
    assert cache.reclaim() == SEGS * 8 * PAGE
    assert budget.used_bytes == 0 == cache.stats().committed_bytes
    cache.close()


def test_grow_beyond_budget_is_refused_and_changes_nothing():
    cache, budget = make(limit=SEGS * 4 * PAGE)
    assert cache.try_allocate(1, 16)  # 2 pages
    assert cache.try_allocate(2, 8)  # 1 page
    before = (cache.capacity(1), cache.stats(), budget.used_bytes, vma_rss(cache.arena.address))
    assert not cache.try_grow(1, 40)
    assert (cache.capacity(1), cache.stats(), budget.used_bytes, vma_rss(cache.arena.address)) == before
    assert cache.try_grow(1, 24)
    assert budget.used_bytes == budget.limit_bytes
    assert not cache.try_allocate(3, 1) and not cache.has_seq(3)
    assert cache.try_allocate(3, 0)
    cache.close()


def test_slots_run_out_clearly():
    cache, _ = make(max_seqs=2)
    assert cache.try_allocate(1, 4)
    assert cache.try_allocate(2, 4)
    before = (cache.stats(), vma_rss(cache.arena.address))
    assert not cache.try_allocate(3, 4)  # every slot holds a live sequence
    assert not cache.has_seq(3) and (cache.stats(), vma_rss(cache.arena.address)) == before
    cache.free(1)
    assert cache.try_allocate(3, 4)
    cache.close()


def test_eager_pages_and_background_prefault():
    cache, budget = make(eager_pages=2, prefault=True)
    assert cache.try_allocate(1, 3)  # 1 page needed, 2 more ahead on the prefault thread
    cache.sync()
    assert cache.capacity(1) == 24
    assert cache.stats().committed_bytes == SEGS * 3 * PAGE == budget.used_bytes
    assert cache.try_grow(1, 9)  # enters the ahead zone: the next page is prefaulted, nothing waits
    cache.sync()
    assert cache.capacity(1) == 32
    plan = write(cache, [SeqStep(1, 0, 9)])
    assert torch.equal(cache.context(1, plan, 0)[0], kv_for(1, 0, 9, 1)[0])
    # Waste, measured by the kernel: one partly filled page and the 2 eager pages per segment, no more.
    resident = arena_resident_bytes(cache)
    assert resident == cache.stats().committed_bytes
    assert 0 <= resident - 9 * LAYOUT.bytes_per_token <= SEGS * (1 + 2) * PAGE
    cache.free(1)
    cache.reclaim()
    assert budget.used_bytes == 0
    cache.close()


@pytest.mark.parametrize("prefault", [False, True])
def test_eager_pages_stop_at_the_final_length(prefault):
    """A sequence whose final length is known (try_allocate's final_tokens) gets no eager page past it: the kernel
    holds exactly the pages of its tokens. The hint caps only what is taken ahead: a grow past it still works."""
    from tests.llm.kv.kernel_pages import arena_pages
    cache, budget = make(eager_pages=2, prefault=prefault)
    assert cache.try_allocate(1, 12, final_tokens=13)  # 2 pages a segment hold its 13 tokens: no page ahead
    assert cache.try_allocate(2, 12)  # no hint: 2 pages + 2 eager
    cache.sync()
    write(cache, [SeqStep(1, 0, 12), SeqStep(2, 0, 12)])
    held = arena_pages(cache).sum(axis=2)  # (slots, segments): pages the kernel holds
    assert (held[cache.slot_of(1)] == 2).all() and (held[cache.slot_of(2)] == 4).all()
    assert arena_resident_bytes(cache) == cache.stats().committed_bytes == budget.used_bytes
    assert cache.try_grow(1, 30)  # past the hint: 4 pages, still none ahead of them
    cache.sync()
    assert (arena_pages(cache).sum(axis=2)[cache.slot_of(1)] == 4).all() and cache.capacity(1) == 32
    assert cache.try_grow(1, 30, final_tokens=64)  # a new hint (a session's next turn): the eager pages again
    cache.sync()
    assert (arena_pages(cache).sum(axis=2)[cache.slot_of(1)] == 6).all()
    cache.close()


@pytest.mark.parametrize("watermark_pages", [0, 8])
def test_idle_reclaim_of_several_slots_is_one_arena_call_that_the_kernel_sees(watermark_pages):
    """Idle slots past the watermark go back oldest first, all in one decommit_many; the kernel's page table shows
    exactly the kept slots' pages, and the bytes returned and the budget match it."""
    import time

    from tests.llm.kv.kernel_pages import arena_pages
    cache, budget = make(max_seqs=4)
    for k, n in ((1, 40), (2, 20), (3, 64)):  # 5, 3 and 8 pages a segment
        assert cache.try_allocate(k, n)
    slots = {k: cache.slot_of(k) for k in (1, 2, 3)}
    for k in (1, 2, 3):  # idle in this order: the oldest goes first
        cache.free(k)
    assert arena_resident_bytes(cache) == SEGS * 16 * PAGE
    calls = []
    real = cache.arena.decommit_many
    cache.arena.decommit_many = lambda ranges: (calls.append(len(ranges)), real(ranges))[1]
    freed = cache.reclaim_idle(SEGS * watermark_pages * PAGE, 0.0, now=time.monotonic() + 1)
    assert len(calls) == 1  # seq 1's and seq 2's slots (16 -> 11 -> 8 pages), or all three, in one call
    kept = {0: [], 8: [3]}[watermark_pages]
    held = arena_pages(cache).sum(axis=2)  # (slots, segments)
    for k, slot in slots.items():
        assert (held[slot] == ({3: 8}[k] if k in kept else 0)).all()
    assert freed == SEGS * (16 - watermark_pages) * PAGE
    assert arena_resident_bytes(cache) == budget.used_bytes == cache.idle_bytes == SEGS * watermark_pages * PAGE
    cache.close()


def test_idle_reclaim_leaves_due_slots_to_the_sequences_about_to_be_placed():
    """keep_slots=2 (two sequences waiting): of three due idle slots the oldest goes back, the two newest keep their
    pages and the new sequences take them; the kernel shows their old rows still there when they are handed over
    (a decommitted and recommitted page would read zero), each new sequence reads only its own rows, and with
    nobody waiting everything due goes back."""
    import time

    from tests.llm.kv.kernel_pages import arena_pages
    cache, budget = make(max_seqs=4)
    for k in (1, 2, 3):  # 40 tokens: 5 pages a segment each
        assert cache.try_allocate(k, 40)
        write(cache, [SeqStep(k, 0, 40)])
    slots = {k: cache.slot_of(k) for k in (1, 2, 3)}
    for k in (1, 2, 3):
        cache.free(k)
    assert cache.reclaim_idle(0, 0.0, now=time.monotonic() + 1, keep_slots=2) == SEGS * 5 * PAGE
    held = arena_pages(cache).sum(axis=2)  # (slots, segments)
    assert (held[slots[1]] == 0).all() and (held[slots[2]] == 5).all() and (held[slots[3]] == 5).all()
    for k in (4, 5):  # 30 tokens: 4 pages a segment
        assert cache.try_allocate(k, 30)
    old = {cache.slot_of(4): 2, cache.slot_of(5): 3} if cache.slot_of(4) == slots[2] else {cache.slot_of(4): 3, cache.slot_of(5): 2}
    assert set(old) == {slots[2], slots[3]}
    for slot, k in old.items():  # the stale rows of the 4 pages kept, untouched by the handover
        assert torch.equal(cache.k[1][slot, :32], kv_for(k, 0, 32, 1)[0])
    assert arena_resident_bytes(cache) == budget.used_bytes == SEGS * 8 * PAGE  # each surplus page trimmed
    write(cache, [SeqStep(4, 0, 30), SeqStep(5, 0, 30)])
    plan = cache.plan_step([SeqStep(4, 30, 0), SeqStep(5, 30, 0)])
    for i, k in enumerate((4, 5)):
        assert torch.equal(cache.context(1, plan, i)[0], kv_for(k, 0, 30, 1)[0])
    cache.free(4)
    cache.free(5)
    assert cache.reclaim_idle(0, 0.0, now=time.monotonic() + 1) == SEGS * 8 * PAGE
    assert arena_resident_bytes(cache) == budget.used_bytes == 0
    cache.close()


def test_attempts_stay_all_or_nothing_while_the_prefault_thread_commits():
    """Growth attempts race the background prefaulter (eager pages queued, not yet committed) under a budget
    too small for everyone: each attempt either gives the capacity or changes nothing, and the pages the
    kernel holds stay what the cache says it committed, within the budget."""
    cache, budget = make(limit=SEGS * 12 * PAGE, eager_pages=2, prefault=True, max_seqs=3)
    lens = {1: 0, 2: 0, 3: 0}
    for sid in lens:
        assert cache.try_allocate(sid, 1)
    granted = refused = 0
    for i in range(300):
        sid = 1 + i % 3
        want = min(LAYOUT.max_seq_len, lens[sid] + 1 + (i * 7) % 9)
        cap = cache.capacity(sid)
        if cache.try_grow(sid, want):  # no sync(): the prefault thread may be committing right now
            granted += 1
            lens[sid] = want
            assert cache.capacity(sid) >= want
        else:
            refused += 1
            assert cache.capacity(sid) >= cap  # unchanged (a late prefault may only have added pages)
        if lens[sid] >= 40:  # start over, so growth keeps hitting the budget
            cache.free(sid)
            lens[sid] = 0
            assert cache.try_allocate(sid, 1) or not cache.has_seq(sid)
            if not cache.has_seq(sid):
                cache.sync()
                cache.reclaim()
                assert cache.try_allocate(sid, 1)
    cache.sync()
    assert granted and refused  # both outcomes happened
    resident = arena_resident_bytes(cache)
    assert resident == cache.stats().committed_bytes == budget.used_bytes <= budget.limit_bytes
    cache.close()


def test_eager_pages_are_skipped_when_the_budget_is_tight():
    cache, budget = make(limit=SEGS * 2 * PAGE, eager_pages=4)
    assert cache.try_allocate(1, 10)  # needs exactly the 2 pages of the budget; eager pages silently skipped
    assert cache.capacity(1) == 16 and budget.used_bytes == budget.limit_bytes
    cache.close()


def test_misuse_gets_clear_errors():
    cache, _ = make()
    assert cache.try_allocate(1, 8)
    with pytest.raises(KVCacheError, match="already allocated"):
        cache.try_allocate(1, 8)
    with pytest.raises(KVCacheError, match="unknown sequence"):
        cache.try_grow(9, 8)
    with pytest.raises(KVCacheError, match="max_seq_len"):
        cache.try_allocate(2, 65)
    assert not cache.has_seq(2)
    with pytest.raises(KVCacheError, match="needs try_grow"):
        cache.plan_step([SeqStep(1, 0, 9)])
    with pytest.raises(KVCacheError, match="only 0 tokens"):
        cache.plan_step([SeqStep(1, 2, 1)])
    with pytest.raises(KVCacheError, match="twice"):
        cache.plan_step([SeqStep(1, 0, 1), SeqStep(1, 1, 1)])
    plan = cache.plan_step([SeqStep(1, 0, 2)])
    with pytest.raises(KVCacheError, match="dtype"):
        cache.write(0, plan, torch.zeros(2, 2, 64, dtype=torch.float64), torch.zeros(2, 2, 64, dtype=torch.float64))
    cache.free(1)
    with pytest.raises(KVCacheError, match="unknown sequence"):
        cache.free(1)
    cache.close()


def test_factory():
    budget = MemoryBudget(2**22)
    cache = create_kv_cache("virtual", LAYOUT, budget, max_seqs=2, prefault=False)
    assert isinstance(cache, VirtualKVCache) and cache.max_seqs == 2
    cache.close()
    with pytest.raises(ValueError, match="unknown KV cache kind 'vattn'"):
        create_kv_cache("vattn", LAYOUT, budget)
    with pytest.raises(ValueError, match="unknown option.*block_size"):
        create_kv_cache("virtual", LAYOUT, budget, block_size=16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_virtual_cache_on_cuda():
    layout = KVLayout(2, 2, 64, torch.float16, 4096, device=torch.device("cuda"))
    budget = MemoryBudget(2**30)
    cache = VirtualKVCache(layout, budget, max_seqs=4)
    assert cache.try_allocate(1, 100)
    assert cache.try_allocate(2, 4096)
    plan = cache.plan_step([SeqStep(1, 0, 100), SeqStep(2, 0, 4096)])
    k = torch.randn(4196, 2, 64, device="cuda", dtype=torch.float16)
    cache.write(0, plan, k, -k)
    kb, vb = cache.context_batch(0, plan)  # row 0 reads past its pages: scratch-backed
    torch.cuda.synchronize()
    assert torch.equal(kb[0, :100], k[:100]) and torch.equal(vb[1, :4096], -k[100:])
    assert cache.stats().committed_bytes == budget.used_bytes
    cache.free(1), cache.free(2)
    cache.reclaim()
    assert budget.used_bytes == 0
    cache.close()


def test_token_major_layout_commits_one_segment_per_sequence():
    """Token-major: a sequence's rows hold every layer's K and V, so it commits ceil(n x bytes_per_token /
    page) pages in all (at most one partly filled), where the per-layer layout commits a page per segment."""
    tm, budget = make(token_major=True)
    per_layer, _ = make()
    assert tm.token_major and not per_layer.token_major and tm.num_segments == 1
    for cache in (tm, per_layer):
        assert cache.try_allocate(1, 3)
        assert cache.try_allocate(2, 20)
        write(cache, [SeqStep(1, 0, 3), SeqStep(2, 0, 20)])
    row = LAYOUT.bytes_per_token  # 2 layers x (K, V) x 512 B = 2 KiB: two tokens per page
    assert tm.stats().committed_bytes == (-(-3 * row // PAGE) + -(-20 * row // PAGE)) * PAGE == budget.used_bytes
    assert per_layer.stats().committed_bytes == SEGS * 1 * PAGE + SEGS * 3 * PAGE  # 1 and 3 pages per segment
    resident = arena_resident_bytes(tm)  # the kernel's count: one partly filled page per sequence at most
    assert resident == tm.stats().committed_bytes
    assert 0 <= resident - (3 + 20) * row < 2 * PAGE
    for layer in range(LAYOUT.num_layers):
        for sid, n in ((1, 3), (2, 20)):
            k_ref, v_ref = kv_for(sid, 0, n, layer)
            k, v = tm.k[layer][tm.slot_of(sid), :n], tm.v[layer][tm.slot_of(sid), :n]
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    tm.free(1), tm.free(2), per_layer.free(1), per_layer.free(2)
    tm.reclaim()
    assert budget.used_bytes == 0
    tm.close(), per_layer.close()


def test_engine_kv_layout_option_is_checked():
    from memfit.llm.engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="kv_layout"):
        LLMEngine(model="memfit-tiny", kv_layout="diagonal", kv_budget="8MiB", device="cpu")


def test_head_major_layout_keeps_each_heads_rows_contiguous():
    """Head-major: a segment per (layer, K|V, head), so one head's rows of a sequence are adjacent (the
    attention kernel streams them); the views keep their shape and hold the same tokens; each segment holds
    at most one partly filled page."""
    hm, budget = make(head_major=True)
    assert hm.num_segments == SEGS * LAYOUT.num_kv_heads and hm.row_bytes == LAYOUT.head_dim * 4
    k0 = hm.k[0]
    assert k0.shape == (hm.max_seqs, LAYOUT.max_seq_len, 2, 64)
    assert k0.stride()[1:] == (64, hm.seg_bytes // 4, 1)  # token rows D apart; heads a segment apart
    assert hm.try_allocate(1, 3) and hm.try_allocate(2, 20)
    write(hm, [SeqStep(1, 0, 3), SeqStep(2, 0, 20)])
    for layer in range(LAYOUT.num_layers):
        for sid, n in ((1, 3), (2, 20)):
            k_ref, v_ref = kv_for(sid, 0, n, layer)
            k, v = hm.k[layer][hm.slot_of(sid), :n], hm.v[layer][hm.slot_of(sid), :n]
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    per_seg = [-(-n * hm.row_bytes // PAGE) for n in (3, 20)]  # 256 B rows: 16 tokens a page
    assert arena_resident_bytes(hm) == hm.num_segments * sum(per_seg) * PAGE == budget.used_bytes
    with pytest.raises(ValueError, match="head_major"):
        make(head_major=True, token_major=True)
    hm.free(1), hm.free(2)
    hm.reclaim()
    assert budget.used_bytes == 0
    hm.close()


@pytest.mark.parametrize("slices_max", [0, 8])
def test_a_steps_rows_land_in_their_slots_by_slices_or_by_index(monkeypatch, slices_max):
    """write() copies a few sequences' rows slice by slice and many by one index_put_: either way each row lands
    at (its sequence's slot, its position) and nothing else changes."""
    import memfit.llm.kv.virtual_io as virtual

    monkeypatch.setattr(virtual, "WRITE_SLICES_MAX", slices_max)
    cache, _ = make()
    for sid in (1, 2, 3):
        assert cache.try_allocate(sid, 40)
    write(cache, [SeqStep(1, 0, 5), SeqStep(2, 0, 9), SeqStep(3, 0, 1)])  # prefill chunks of 5, 9 and 1 rows
    write(cache, [SeqStep(2, 9, 3), SeqStep(1, 5, 2), SeqStep(3, 1, 1)])  # a decode row among them: by index
    write(cache, [SeqStep(2, 12, 2), SeqStep(3, 2, 3)])  # out of slot order, by slices
    write(cache, [SeqStep(1, 7, 1)])  # one sequence: its own slice
    for sid, n in ((1, 8), (2, 14), (3, 5)):
        plan = cache.plan_step([SeqStep(sid, n, 0)])
        for layer in range(LAYOUT.num_layers):
            k, v = cache.context(layer, plan, 0)
            want = kv_for(sid, 0, n, layer)[0]
            assert torch.equal(k, want) and torch.equal(v, -want)
            slot = cache.slot_of(sid)
            assert torch.all(cache.k[layer][slot, n:] == 0)  # past the written rows: untouched


@pytest.mark.parametrize("slices_max", [0, 1, 8])
def test_equal_chunks_in_consecutive_slots_are_written_as_one_run(monkeypatch, slices_max):
    """Sequences in consecutive slots with the same positions are one run, one copy (so a batch of equal prompts
    takes the slice path however many there are, slices_max 1); a different length or a gap in the slots starts
    another run. By runs or by index, each row lands at (its slot, its position)."""
    import memfit.llm.kv.virtual_io as virtual

    monkeypatch.setattr(virtual, "WRITE_SLICES_MAX", slices_max)
    cache, _ = make(max_seqs=10)
    sids = list(range(1, 11))
    for sid in sids:
        assert cache.try_allocate(sid, 40)
    slot = {sid: cache.slot_of(sid) for sid in sids}
    order = sorted(sids, key=lambda s: slot[s])
    assert [slot[s] for s in order] == list(range(10))
    plan = write(cache, [SeqStep(sid, 0, 6) for sid in order])  # ten chunks of 6 rows
    assert plan.runs == [(0, 10, 6, 6)]
    mixed = [SeqStep(order[0], 6, 3), SeqStep(order[1], 6, 3), SeqStep(order[2], 6, 4), SeqStep(order[4], 6, 4)]
    plan = write(cache, mixed)
    assert plan.runs == [(0, 2, 9, 3), (2, 1, 10, 4), (4, 1, 10, 4)]  # 3 rows twice; 4 rows; a gap in the slots
    ends = {sid: 6 for sid in sids} | {order[0]: 9, order[1]: 9, order[2]: 10, order[4]: 10}
    for sid, n in ends.items():
        plan = cache.plan_step([SeqStep(sid, n, 0)])
        for layer in range(LAYOUT.num_layers):
            k, v = cache.context(layer, plan, 0)
            want = kv_for(sid, 0, n, layer)[0]
            assert torch.equal(k, want) and torch.equal(v, -want)
            assert torch.all(cache.k[layer][slot[sid], n:] == 0)  # past the written rows: untouched


@pytest.mark.parametrize("slices_max", [0, 8])
def test_a_write_with_more_rows_than_the_step_is_refused_by_slices_or_by_index(monkeypatch, slices_max):
    import memfit.llm.kv.virtual_io as virtual

    monkeypatch.setattr(virtual, "WRITE_SLICES_MAX", slices_max)
    cache, _ = make()
    for sid in (1, 2):
        assert cache.try_allocate(sid, 40)
    plan = cache.plan_step([SeqStep(1, 0, 4), SeqStep(2, 0, 4)])
    k = torch.ones(8 + 3, LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=LAYOUT.dtype)
    with pytest.raises((KVCacheError, RuntimeError)):
        cache.write(0, plan, k, -k)
