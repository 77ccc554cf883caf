"""PreallocatedKVCache (`--kv-cache preallocated`): every slot committed at full length up front, checked against
the pages the kernel holds (/proc/self/pagemap) and against the ledger; nothing ever given back; a budget short of
full length refused at construction; in the engine, both the target's and the draft's caches preallocated and
greedy speculative output equal to plain decoding."""
import pytest
import torch

from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded
from tests.llm.kv.kernel_pages import arena_resident_bytes
from tests.llm.kv.test_virtual import kv_for

# 2 layers x 2 KV heads x 64 x 4 B: 2 KiB per token (K and V); 256 tokens: 512 KiB per slot
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_seq_len=256)
FULL = 3 * LAYOUT.max_seq_len * LAYOUT.bytes_per_token  # three slots at full length


def make(limit: int = 2**24):
    budget = MemoryBudget(limit, name="kv_budget")
    return create_kv_cache("preallocated", LAYOUT, budget, max_seqs=3), budget


def write(cache, seq_id: int, start: int, n: int) -> None:
    plan = cache.plan_step([SeqStep(seq_id, start, n)])
    for layer in range(LAYOUT.num_layers):
        k, v = kv_for(seq_id, start, n, layer)
        cache.write(layer, plan, k, v)


def test_every_slot_is_committed_at_full_length_before_any_sequence():
    cache, budget = make()
    # the kernel holds every page of every slot (an independent measure), and the ledger the same bytes
    assert arena_resident_bytes(cache) == FULL
    assert cache.committed_bytes == budget.used_bytes == budget.by_owner()["kv"] == FULL
    assert cache.num_free_slots == 3 and cache.stats().tokens_held == 0
    cache.close()
    assert budget.used_bytes == 0


def test_sequences_come_and_go_without_committing_or_giving_back_anything():
    cache, budget = make()
    assert cache.try_allocate(1, 5) and cache.capacity(1) == LAYOUT.max_seq_len
    write(cache, 1, 0, 5)
    assert cache.try_grow(1, LAYOUT.max_seq_len)  # already there: no commit
    assert cache.try_allocate(2, 200) and cache.try_allocate(3, 1)
    assert not cache.try_allocate(4, 1)  # three slots, all taken
    write(cache, 2, 0, 200)
    k, _ = cache.context(0, cache.plan_step([SeqStep(2, 200, 1)]), 0)
    assert torch.equal(k[:200], kv_for(2, 0, 200, 0)[0])
    for sid in (1, 2, 3):
        cache.free(sid)
    assert cache.reclaim() == 0 and cache.reclaim_idle(0, 0.0, now=1e12) == 0
    assert arena_resident_bytes(cache) == cache.committed_bytes == budget.used_bytes == FULL
    assert cache.try_allocate(5, 3) and cache.slot_of(5) == 0  # the lowest free slot again
    cache.close()


def test_a_budget_short_of_full_length_is_refused_with_nothing_held():
    budget = MemoryBudget(FULL - 1, name="kv_budget")
    with pytest.raises(MemoryBudgetExceeded, match="commits 1.50 MiB up front.*--kv-cache virtual"):
        create_kv_cache("preallocated", LAYOUT, budget, max_seqs=3)
    assert budget.used_bytes == 0


def test_engine_preallocates_target_and_draft_and_decodes_greedy_as_plain():
    from memfit.llm import LLM, SamplingParams

    common = dict(dtype="float32", max_num_seqs=2, max_model_len=192, threads=1)
    plain = LLM("memfit-tiny", **common)
    spec = LLM("memfit-tiny", kv_cache="preallocated", speculative_model="memfit-tiny-draft",
               num_speculative_tokens=3, **common)
    eng = spec.engine
    target_full = 2 * 192 * eng.layout.bytes_per_token
    draft_full = 2 * 192 * eng.spec.draft_kv.layout.bytes_per_token
    try:
        for kv, full in ((eng.kv, target_full), (eng.spec.draft_kv, draft_full)):
            assert arena_resident_bytes(kv) == kv.committed_bytes == kv.budget.used_bytes == full
        sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        prompts = ["def add(a, b):", "Once upon a time"]
        first = [o.token_ids for o in plain.generate(prompts, sp)]
        assert [o.token_ids for o in spec.generate(prompts, sp)] == first
        # a second turn re-prefills the whole history (no prefix caching): still plain's tokens
        history = [plain.tokenizer.encode(p) + ids for p, ids in zip(prompts, first)]
        again = [o.token_ids for o in plain.generate(prompt_token_ids=history, sampling_params=sp)]
        assert [o.token_ids for o in spec.generate(prompt_token_ids=history, sampling_params=sp)] == again
        assert eng.kv.prefix_caching is False and eng.stats()["speculative"]["spec_steps"] > 0
        for kv, full in ((eng.kv, target_full), (eng.spec.draft_kv, draft_full)):
            assert arena_resident_bytes(kv) == kv.committed_bytes == full  # nothing grew, nothing given back
    finally:
        plain.engine.close()
        eng.close()
