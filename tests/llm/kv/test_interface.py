"""The KV-manager interface as every registered manager implements it: capacity by attempt, the base
class's per-sequence bookkeeping (plan validation, truncate, stats), and the declared layout capabilities."""
import pytest
import torch

from memfit.llm.kv import KVCacheError, KVCacheManager, create_kv_cache, kv_cache_class, kv_kinds
from memfit.llm.kv.base import SeqStep
from memfit.memory.budget import MemoryBudget
from tests.llm.kv.kernel_pages import arena_resident_bytes
from tests.llm.kv.test_virtual import LAYOUT, kv_for, write

OPTS = {"virtual": {"max_seqs": 4, "prefault": False}, "paged": {"block_size": 4}, "preallocated": {"max_seqs": 4}}


def make(kind: str, limit: int = 2**22) -> KVCacheManager:
    return create_kv_cache(kind, LAYOUT, MemoryBudget(limit), **OPTS.get(kind, {}))


@pytest.mark.parametrize("kind", kv_kinds())
def test_attempts_take_capacity_or_change_nothing(kind):
    if kind == "preallocated":
        pytest.skip("commits every slot when built, so no attempt takes capacity (tests/llm/kv/test_preallocated.py)")
    cache = make(kind, limit=3 * 16 * LAYOUT.bytes_per_token)  # room for about 48 tokens, either kind
    assert cache.try_allocate(1, 16) and cache.capacity(1) >= 16
    assert cache.try_grow(1, 8) and cache.capacity(1) >= 16  # already held: nothing to do
    before = (cache.stats(), cache.budget.used_bytes, cache.capacity(1))
    assert not cache.try_grow(1, LAYOUT.max_seq_len)  # 64 tokens do not fit
    assert not cache.try_allocate(2, LAYOUT.max_seq_len)
    assert not cache.has_seq(2) and (cache.stats(), cache.budget.used_bytes, cache.capacity(1)) == before
    with pytest.raises(KVCacheError, match="already allocated"):
        cache.try_allocate(1, 1)
    with pytest.raises(KVCacheError, match="max_seq_len"):
        cache.try_grow(1, LAYOUT.max_seq_len + 1)
    with pytest.raises(KVCacheError, match="unknown sequence"):
        cache.try_grow(7, 1)
    cache.free(1)
    assert cache.try_allocate(2, 48)  # the whole budget, once 1's memory is given back (or reused)
    assert cache.stats().committed_bytes == cache.budget.used_bytes
    cache.close()


@pytest.mark.parametrize("kind", kv_kinds())
def test_plans_are_validated_and_truncate_forgets_positions(kind):
    cache = make(kind)
    assert cache.try_allocate(1, 12) and cache.try_allocate(2, 5)
    write(cache, [SeqStep(1, 0, 10), SeqStep(2, 0, 5)])
    assert (cache.num_tokens(1), cache.num_tokens(2)) == (10, 5)
    st = cache.stats()
    assert (st.tokens_held, st.num_seqs, st.used_bytes) == (15, 2, 15 * LAYOUT.bytes_per_token)
    with pytest.raises(KVCacheError, match="at least one"):
        cache.plan_step([])
    with pytest.raises(KVCacheError, match="twice"):
        cache.plan_step([SeqStep(1, 10, 1), SeqStep(1, 11, 1)])
    with pytest.raises(KVCacheError, match="only 5 tokens"):
        cache.plan_step([SeqStep(2, 6, 1)])
    with pytest.raises(KVCacheError, match="needs try_grow"):
        cache.plan_step([SeqStep(2, 5, cache.capacity(2))])
    assert cache.num_tokens(2) == 5  # a refused plan records nothing
    cache.truncate(1, 4)  # a new turn shares 4 tokens: positions 4.. are rewritten
    assert cache.num_tokens(1) == 4 and cache.capacity(1) >= 12
    with pytest.raises(KVCacheError, match="only 4 tokens"):
        cache.plan_step([SeqStep(1, 6, 1)])
    plan = write(cache, [SeqStep(1, 4, 3)])
    assert cache.num_tokens(1) == 7
    k, _ = cache.context(1, plan, 0)
    assert torch.equal(k, kv_for(1, 0, 7, 1)[0])
    with pytest.raises(KVCacheError, match="cannot truncate"):
        cache.truncate(1, -1)
    cache.close()


@pytest.mark.parametrize("kind", kv_kinds())
def test_layout_capabilities_are_declared(kind):
    cache = make(kind)
    assert cache.try_allocate(1, 3) and cache.try_allocate(2, 9)
    plan = write(cache, [SeqStep(2, 0, 9), SeqStep(1, 0, 3)])
    if not cache.fixed_stride:
        assert cache.slot_of(1) is None and cache.strided(0) is None
    else:  # the views and slots the CPU decode kernel reads in place
        assert plan.slots == [cache.slot_of(2), cache.slot_of(1)]
        for layer in range(LAYOUT.num_layers):
            kc, vc = cache.strided(layer)  # (slots, max_len, Hkv, D)
            for i, (sid, n) in enumerate(((2, 9), (1, 3))):
                k, v = cache.context(layer, plan, i)
                assert torch.equal(kc[cache.slot_of(sid), :n], k) and torch.equal(vc[cache.slot_of(sid), :n], v)
    cache.close()


def test_a_fixed_stride_manager_must_provide_its_views():
    with pytest.raises(TypeError, match="fixed_stride"):
        type("Broken", (KVCacheManager,), {"fixed_stride": True})


@pytest.mark.parametrize("layout_opts", [{}, {"token_major": True}, {"head_major": True}, {"block_size": 16}])
@pytest.mark.parametrize("kind", kv_kinds())
def test_full_sequence_bytes_is_what_a_full_length_sequence_commits(kind, layout_opts):
    """The engine sizes the KV share from the class's figure before the manager exists: it must equal what the
    built manager commits for a sequence at max_seq_len (its page or block rounding included), or a
    full-length request is refused with memory to spare."""
    opts = {k: v for k, v in {**OPTS.get(kind, {}), **layout_opts}.items()
            if k in ({"block_size"} if kind == "paged" else {"max_seqs", "prefault", "token_major", "head_major"})}
    full = kv_cache_class(kind).full_sequence_bytes(LAYOUT, **opts)
    slots = opts.get("max_seqs", 1) if kind == "preallocated" else 1  # that kind commits every slot when built
    cache = create_kv_cache(kind, LAYOUT, MemoryBudget(slots * full), **opts)
    assert full == cache.bytes_needed(LAYOUT.max_seq_len)
    if kind != "preallocated":  # a budget of exactly that figure holds one full-length sequence
        assert cache.try_allocate(1, LAYOUT.max_seq_len)
    # what the kernel holds for the arena's pages (virtual kinds; the paged pool's blocks by its free list)
    held = cache.stats().committed_bytes if kind == "paged" else arena_resident_bytes(cache)
    assert held == slots * full
    cache.close()
