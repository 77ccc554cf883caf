"""PagedKVCache: block tables, O(1) free list, per-block budget accounting, gathered contexts."""
import pytest
import torch

from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVCacheError, KVLayout, SeqStep
from memfit.llm.kv.paged import PagedKVCache
from memfit.memory.budget import MemoryBudget
from tests.llm.kv.test_virtual import LAYOUT, kv_for, write

BPT = LAYOUT.bytes_per_token  # 2 layers x (K+V) x 2 heads x 64 x 4 B = 2048


def make(limit=2**22, block_size=4, **kw) -> tuple[PagedKVCache, MemoryBudget]:
    budget = MemoryBudget(limit, name="kv_budget")
    return PagedKVCache(LAYOUT, budget, block_size=block_size, **kw), budget


def test_blocks_and_budget_follow_allocation():
    cache, budget = make(num_blocks=10)
    assert cache.block_bytes == 4 * BPT and cache.pool_bytes == 10 * 4 * BPT
    assert cache.try_allocate(1, 5)  # 2 blocks
    assert cache.capacity(1) == 8 and cache.block_table(1) == [0, 1]
    assert cache.stats().committed_bytes == 2 * cache.block_bytes == budget.by_owner()["kv"]
    assert cache.try_grow(1, 8)
    assert cache.block_table(1) == [0, 1]
    assert cache.try_grow(1, 9)
    assert cache.block_table(1) == [0, 1, 2] and budget.used_bytes == 3 * cache.block_bytes
    assert cache.try_allocate(2, 4)
    assert cache.block_table(2) == [3]
    cache.free(1)
    assert budget.used_bytes == cache.block_bytes and cache.num_free_blocks == 9
    assert cache.try_allocate(3, 12)  # recently freed blocks come back first (O(1) stack)
    assert sorted(cache.block_table(3)) == [0, 1, 2]
    cache.close()
    assert budget.used_bytes == 0


def test_default_pool_is_sized_by_the_budget():
    cache, _ = make(limit=100 * 4 * BPT + 5)
    assert cache.num_blocks == 100
    capped, _ = make(limit=100 * 4 * BPT, max_seqs=2)
    assert capped.num_blocks == 2 * 64 // 4
    with pytest.raises(ValueError, match="holds no"):
        make(limit=BPT)


def test_gathered_contexts_hold_each_sequences_tokens():
    cache, _ = make()
    for sid, n in [(1, 5), (2, 13), (3, 1)]:
        assert cache.try_allocate(sid, n)
    cache.free(1)  # fragment the free list
    assert cache.try_allocate(1, 5)
    plan = write(cache, [SeqStep(2, 0, 13), SeqStep(1, 0, 5), SeqStep(3, 0, 1)])
    for layer in range(LAYOUT.num_layers):
        kb, vb = cache.context_batch(layer, plan)
        assert kb.shape == (3, 13, 2, 64)
        for i, (sid, n) in enumerate([(2, 13), (1, 5), (3, 1)]):
            k, v = cache.context(layer, plan, i)
            ek, ev = kv_for(sid, 0, n, layer)
            assert torch.equal(k, ek) and torch.equal(v, ev)
            assert torch.equal(kb[i, :n], ek) and torch.equal(vb[i, :n], ev)
    assert cache.try_grow(3, 2)
    plan = write(cache, [SeqStep(3, 1, 1)])  # decode append
    assert torch.equal(cache.context(0, plan, 0)[0], kv_for(3, 0, 2, 0)[0])
    assert cache.num_tokens(3) == 2
    cache.close()


def test_out_of_blocks_or_budget_is_refused_and_changes_nothing():
    cache, budget = make(num_blocks=4, limit=3 * 4 * BPT)
    assert cache.try_allocate(1, 8)
    before = (cache.block_table(1), cache.stats(), budget.used_bytes, cache.num_free_blocks)
    assert not cache.try_grow(1, 13)  # budget: 3 blocks
    assert (cache.block_table(1), cache.stats(), budget.used_bytes, cache.num_free_blocks) == before
    cache2, _ = make(num_blocks=2)
    assert cache2.try_allocate(1, 8)
    before = (cache2.stats(), cache2.budget.used_bytes, cache2.num_free_blocks)
    assert not cache2.try_allocate(2, 1)  # out of blocks, though the budget has room
    assert not cache2.has_seq(2) and (cache2.stats(), cache2.budget.used_bytes, cache2.num_free_blocks) == before


def test_misuse_gets_clear_errors():
    cache, _ = make()
    assert cache.try_allocate(1, 4)
    with pytest.raises(KVCacheError, match="already allocated"):
        cache.try_allocate(1, 4)
    with pytest.raises(KVCacheError, match="max_seq_len"):
        cache.try_grow(1, 65)
    with pytest.raises(KVCacheError, match="needs try_grow"):
        cache.plan_step([SeqStep(1, 0, 5)])
    with pytest.raises(KVCacheError, match="twice"):
        cache.plan_step([SeqStep(1, 0, 1), SeqStep(1, 1, 1)])
    with pytest.raises(KVCacheError, match="unknown"):
        cache.free(7)
    with pytest.raises(ValueError, match="block_size"):
        make(block_size=0)


def test_factory_and_block_size():
    budget = MemoryBudget(2**22)
    cache = create_kv_cache("paged", LAYOUT, budget, block_size=8, num_blocks=16)
    assert isinstance(cache, PagedKVCache) and cache.block_size == 8 and cache.num_blocks == 16
    assert cache.try_allocate(1, 9)
    assert cache.capacity(1) == 16
    default = create_kv_cache("paged", LAYOUT, budget, max_seqs=1)
    assert default.block_size == 16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_cache_on_cuda():
    layout = KVLayout(2, 2, 64, torch.float16, 256, device=torch.device("cuda"))
    cache = PagedKVCache(layout, MemoryBudget(2**26), max_seqs=4)
    assert cache.try_allocate(1, 40)
    plan = cache.plan_step([SeqStep(1, 0, 40)])
    k = torch.randn(40, 2, 64, device="cuda", dtype=torch.float16)
    cache.write(1, plan, k, -k)
    assert torch.equal(cache.context(1, plan, 0)[0], k)


@pytest.mark.parametrize("head_major", [False, True])
def test_block_interiors_token_or_head_major_hold_the_same_tokens(head_major):
    """Blocks laid out head-major (vLLM's CPU layout: one head's rows of a block contiguous) or token-major
    (its GPU layout) differ only in the pools' strides: writes, gathers and the pools' views agree."""
    cache, _ = make(num_blocks=8, head_major=head_major)
    assert cache.block_tables and cache.try_allocate(1, 7) and cache.try_allocate(2, 3)
    plan = write(cache, [SeqStep(1, 0, 7), SeqStep(2, 0, 3)])
    kp, vp = cache.pools(1)
    assert kp.shape == (8, 4, 2, 64)  # (blocks, block_size, Hkv, D) either way
    assert kp.stride() == ((2 * 4 * 64, 64, 4 * 64, 1) if head_major else (4 * 2 * 64, 2 * 64, 64, 1))
    for i, (sid, n) in enumerate([(1, 7), (2, 3)]):
        expect_k, expect_v = kv_for(sid, 0, n, 1)
        k, v = cache.context(1, plan, i)
        assert torch.equal(k, expect_k) and torch.equal(v, expect_v)
        table = plan.batch_table[i]
        rows = torch.cat([kp[b] for b in table.tolist()])[:n]  # the pool's view, block by block
        assert torch.equal(rows, expect_k)
    cache.close()
