"""Tree speculation in the engine (engine/spec_tree_step.py, `speculative_tree=(W, D)`) on the bundled pair
memfit-tiny / memfit-tiny-draft: greedy output identical to plain decoding (batched, float32, both caches, prefix
caching on), ragged acceptance, K/V of rejected nodes gone from both caches (checked against the kernel's page
tables), and the errors: bad shapes, sampled requests, a tree that cannot fit the budget."""
from __future__ import annotations

import pytest

from memfit.llm.engine import spec_tree_step
from memfit.llm.engine.api import LLM
from memfit.llm.engine.errors import RequestError
from memfit.llm.engine.params import SamplingParams
from memfit.memory.budget import MemoryBudgetExceeded
from tests.llm.kv.kernel_pages import PAGE, arena_pages

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n",
           "for i in range(10):", "Hello, my name is"]
DRAFT = "memfit-tiny-draft"


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_greedy_float32_identical_to_plain_decoding_batched(kv_cache: str, monkeypatch) -> None:
    sp = SamplingParams(max_tokens=40, temperature=0)  # eos may stop a sequence inside a verified run
    plain = LLM("memfit-tiny", dtype="float32", kv_cache=kv_cache, max_num_seqs=4, threads=1)
    want = plain.generate(PROMPTS, sp)
    spec = LLM("memfit-tiny", dtype="float32", kv_cache=kv_cache, max_num_seqs=4, threads=1,
               speculative_model=DRAFT, speculative_tree=(3, 3))
    accepted: list[list[int]] = []  # per verification pass: each speculating row's accepted path length
    real = spec_tree_step.greedy_tree_verdict

    def spy(tree, picks):
        out = real(tree, picks)
        if len(tree) > 1:
            accepted[-1].append(len(out[0]))
        return out

    real_step = spec_tree_step.compact
    monkeypatch.setattr(spec_tree_step, "greedy_tree_verdict", spy)
    monkeypatch.setattr(spec_tree_step, "compact", lambda kv, moves: (real_step(kv, moves), accepted.append([])))
    accepted.append([])
    got = spec.generate(PROMPTS, sp)
    assert _tokens(got) == _tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    st = spec.engine.stats()["speculative"]
    assert st["tree"] == [3, 3] and st["num_speculative_tokens"] == 3
    assert st["spec_steps"] > 0 and st["spec_accepted"] > 0 and st["tokens_per_seq_step"] > 1.0
    assert st["draft_kv_tokens_held"] == 0  # finished sequences gave their draft KV back
    assert any(len(set(a)) > 1 for a in accepted)  # ragged: rows of one pass accepted different lengths
    assert any(a for a in accepted if max(a, default=0) == 3)  # and some took a whole branch
    # again on the same engine: the prompts' blocks now come from the prefix cache, written by compacted steps
    assert _tokens(spec.generate(PROMPTS, sp)) == _tokens(want)


def test_rejected_nodes_leave_no_kv_and_pages_match_the_kernel() -> None:
    """After every step each cache holds K/V for exactly the sequence's tokens (target: num_computed; draft: at most
    that), and the pages the kernel holds for a sequence's slot (/proc/self/pagemap) cover its tokens plus at most
    the tree's W x D lookahead, never rejected nodes of earlier steps."""
    w, d = 3, 2
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1, speculative_model=DRAFT,
               speculative_tree=(w, d), kv_prefault=False, kv_eager_pages=0, enable_prefix_caching=False)
    eng = spec.engine
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for p in PROMPTS[:4]:
        eng.add_request(p, sp)
    while eng.has_unfinished_requests():
        eng.step()
        for seq in eng.scheduler.running:
            assert eng.kv.num_tokens(seq.seq_id) == seq.num_computed
            if eng.spec.draft_kv.has_seq(seq.seq_id):
                assert eng.spec.draft_kv.num_tokens(seq.seq_id) <= seq.num_computed
            pages = int(arena_pages(eng.kv)[eng.kv.slot_of(seq.seq_id)].sum())
            assert pages * PAGE >= eng.kv.bytes_needed(seq.num_computed)
            assert pages * PAGE <= eng.kv.bytes_needed(seq.num_tokens + w * d)
    st = eng.stats()["speculative"]
    assert st["spec_proposed"] > st["spec_accepted"] > 0  # there were rejected nodes to drop
    assert st["draft_kv_tokens_held"] == 0


def test_bad_tree_shapes_are_refused_at_start() -> None:
    for bad in ((0, 3), (2, 0), "2,x"):
        with pytest.raises(ValueError, match="speculative_tree"):
            LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=bad)
    with pytest.raises(ValueError, match="needs a speculative_model"):
        LLM("memfit-tiny", speculative_tree=(2, 2))
    with pytest.raises(ValueError, match="depth D"):
        LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(2, 2), num_speculative_tokens=3)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(8, 8), max_num_batched_tokens=64)


def test_sampled_requests_are_refused_and_the_engine_keeps_serving() -> None:
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1, speculative_model=DRAFT,
               speculative_tree=(2, 2))
    with pytest.raises(RequestError, match="greedy"):
        spec.engine.add_request("Once upon a time", SamplingParams(max_tokens=4, temperature=0.8))
    plain = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert _tokens(spec.generate(PROMPTS[:2], sp)) == _tokens(plain.generate(PROMPTS[:2], sp))


def test_a_tree_that_cannot_fit_the_budget_is_refused_at_start() -> None:
    """A budget holding the target, the pair with a 2,4 tree and 12 MiB more is refused for a 64,4 tree: one
    verification pass of that tree's 257 nodes for 4 sequences produces logits (257 x 4 rows of the vocabulary in
    float32: 16.8 MB here) that alone pass the 12 MiB, at start, with an error naming the tree."""
    kw = dict(dtype="float32", max_num_seqs=4, threads=1, max_num_batched_tokens=512)
    plain = LLM("memfit-tiny", memory_budget="400MiB", **kw)
    owners = plain.engine.ledger.by_owner()
    vocab = plain.engine.model_config.vocab_size
    plain.engine.close()
    small = LLM("memfit-tiny", memory_budget="400MiB", speculative_model=DRAFT, speculative_tree=(2, 4), **kw)
    draft = {k: v for k, v in small.engine.ledger.by_owner().items() if k.startswith("draft")}
    small.engine.close()
    room = 12 * 2**20
    budget = sum(owners.values()) + sum(draft.values()) + room
    assert 4 * (64 * 4 + 1) * vocab * 4 > room  # the big tree's verification logits alone
    LLM("memfit-tiny", memory_budget=str(budget), speculative_model=DRAFT, speculative_tree=(2, 4), **kw).engine.close()
    with pytest.raises(MemoryBudgetExceeded, match="64,4 tree"):
        LLM("memfit-tiny", memory_budget=str(budget), speculative_model=DRAFT, speculative_tree=(64, 4), **kw)
