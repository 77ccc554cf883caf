"""Tree speculation in the engine (engine/spec_tree_step.py, `speculative_tree=(W, D)`) on the bundled pair
memfit-tiny / memfit-tiny-draft: greedy output identical to plain decoding (batched, float32, both caches, prefix
caching on), ragged acceptance, K/V of rejected nodes gone from both caches (checked against the kernel's page
tables), sampled requests (reproducible, distributed as the target's), and the errors: bad shapes, a tree that
cannot fit the budget."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from memfit.llm.engine import spec_decode as spec_decode_mod
from memfit.llm.engine import spec_tree_step
from memfit.llm.engine.api import LLM
from memfit.llm.engine.params import SamplingParams
from memfit.memory.budget import MemoryBudgetExceeded
from tests.llm.engine import chi2
from tests.llm.engine.spec_helpers import (DRAFT, PROMPTS, near_tie_divergences,
                                          run_noting_shrinks_before_preemption, run_until_finished, tokens)
from tests.llm.kv.kernel_pages import PAGE, arena_pages



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
    assert tokens(got) == tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    st = spec.engine.stats()["speculative"]
    assert st["tree"] == [3, 3] and st["num_speculative_tokens"] == 3
    assert st["spec_steps"] > 0 and st["spec_accepted"] > 0 and st["tokens_per_seq_step"] > 1.0
    assert st["draft_kv_tokens_held"] == 0  # finished sequences gave their draft KV back
    assert any(len(set(a)) > 1 for a in accepted)  # ragged: rows of one pass accepted different lengths
    assert any(a for a in accepted if max(a, default=0) == 3)  # and some took a whole branch
    # again on the same engine: the prompts' blocks now come from the prefix cache, written by compacted steps
    assert tokens(spec.generate(PROMPTS, sp)) == tokens(want)


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


def test_sampled_trees_are_reproducible_and_greedy_rows_beside_them_are_plain_decoding(monkeypatch) -> None:
    """Sampled requests in a tree engine draft trees (w >= 2 rows with sampled params reach the tree step) and, with
    fixed seeds, two fresh engines emit the same tokens, all in the vocabulary; mixed with greedy requests in one
    batch (greedy verdicts and sampled verdicts in the same passes), the greedy ones still decode as plain decoding
    and the sampled ones stay reproducible."""
    kw = dict(dtype="float32", max_num_seqs=4, threads=1, speculative_model=DRAFT)
    sampled_rows: list[int] = []
    real = spec_decode_mod.speculate_tree

    def spy(dec, rows, result):
        sampled_rows.extend(w for s, w, _ in rows if not s.params.greedy)
        return real(dec, rows, result)

    monkeypatch.setattr(spec_decode_mod, "speculate_tree", spy)
    sampled = [SamplingParams(max_tokens=m, temperature=0.9, top_p=0.95, seed=3 + m, ignore_eos=True) for m in (5, 18)]
    first = LLM("memfit-tiny", speculative_tree=(2, 3), **kw)
    alone = tokens(first.generate(PROMPTS[:2], sampled))
    assert alone == tokens(LLM("memfit-tiny", speculative_tree=(2, 3), **kw).generate(PROMPTS[:2], sampled))
    vocab = first.engine.model_config.vocab_size
    assert [len(t) for t in alone] == [5, 18] and all(0 <= x < vocab for t in alone for x in t)
    assert 2 in sampled_rows and first.engine.stats()["speculative"]["spec_accepted"] > 0
    greedy = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (9, 30)]
    mixed = [LLM("memfit-tiny", speculative_tree=(2, 3), **kw).generate(PROMPTS[:4], sampled + greedy) for _ in "ab"]
    plain = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1)
    assert tokens(mixed[0]) == tokens(mixed[1])
    assert tokens(mixed[0])[2:] == tokens(plain.generate(PROMPTS[2:4], greedy))


@pytest.mark.parametrize("broken", [False, True])
def test_sampled_tree_tokens_are_distributed_as_the_target(broken: bool, monkeypatch) -> None:
    """1000 seeded requests of one prompt, temperature 1 and top-k 8 (a vocabulary of 8 at each position), through
    a 3,2 tree engine: among those whose first token (plain sampling after prefill) is the commonest one, the second
    token (the first of a tree step) fits the target's top-8 distribution after that prefix by chi-square (the
    target's logprobs, renormalised over its top 8). Duplicate draws are merged (some trees have fewer nodes than
    draws). With the residual update removed from the rule the same check fails (the draft's favourites are
    over-represented), so it can tell."""
    from memfit.llm.engine import spec_tree_sample

    if broken:
        monkeypatch.setattr(spec_tree_sample, "residual", lambda p, q: p)
    real_verdict, merged = spec_tree_step.sampled_tree_verdict, []

    def verdict(tree, *a):  # noqa: ANN001, ANN002
        merged.append(sum(len(k) for k in tree.draws) > len(tree) - 1)  # more draws than nodes
        return real_verdict(tree, *a)

    monkeypatch.setattr(spec_tree_step, "sampled_tree_verdict", verdict)
    n = 1000
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=16, threads=1, speculative_model=DRAFT,
               speculative_tree=(3, 2))
    ids = spec.tokenizer.encode("Once upon a time")
    sp = [SamplingParams(max_tokens=4, temperature=1.0, top_k=8, seed=i, ignore_eos=True) for i in range(n)]
    outs = [o.outputs[0].token_ids for o in spec.generate(prompt_token_ids=[ids] * n, sampling_params=sp)]
    assert spec.engine.stats()["speculative"]["spec_accepted"] > 0 and any(merged)
    t1, n1 = Counter(t[0] for t in outs).most_common(1)[0]
    assert n1 >= 300
    seconds = Counter(t[1] for t in outs if t[0] == t1)
    ref = LLM("memfit-tiny", dtype="float32", threads=1).generate(
        prompt_token_ids=[ids + [t1]], sampling_params=SamplingParams(max_tokens=1, temperature=0, logprobs=8))
    top = ref[0].outputs[0].logprobs[0].top  # token -> the target's logprob, its 8 likeliest
    z = sum(math.exp(v) for v in top.values())
    assert set(seconds) <= set(top)  # top-k 8 held: no token outside the target's 8
    fits = chi2.fits([seconds[k] for k in top], [n1 * math.exp(v) / z for k, v in top.items()])
    assert fits is not broken


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
    small_owners = small.engine.ledger.by_owner()
    draft = {k: v for k, v in small_owners.items() if k.startswith("draft")}
    # where the linears are oneDNN's, the draft's own per-shape kernels are reserved under the target's owner
    # shape_cache (engine/fallback_accounting.py): what the pair holds there beyond the target alone
    draft["shape_cache"] = small_owners.get("shape_cache", 0) - owners.get("shape_cache", 0)
    small.engine.close()
    room = 12 * 2**20
    budget = sum(owners.values()) + sum(draft.values()) + room
    assert 4 * (64 * 4 + 1) * vocab * 4 > room  # the big tree's verification logits alone
    LLM("memfit-tiny", memory_budget=str(budget), speculative_model=DRAFT, speculative_tree=(2, 4), **kw).engine.close()
    with pytest.raises(MemoryBudgetExceeded, match="64,4 tree"):
        LLM("memfit-tiny", memory_budget=str(budget), speculative_model=DRAFT, speculative_tree=(64, 4), **kw)


@pytest.mark.parametrize("sampled", [False, True])
def test_tree_buffers_formula_covers_what_a_step_allocates(sampled: bool, monkeypatch) -> None:
    """accounting.tree_speculation_bytes against the tensors a step really makes: the verification logits, the
    largest draft level's logits, the attention masks and ancestor masks, and for sampled requests the draft's
    distributions kept over the step and the target's rows (their sizes read from the tensors). The formula reserves
    for sampled requests (an engine cannot know which will come), and is within 1.2x of a sampled step."""
    from memfit.llm.engine import accounting, spec_tree_forward
    from memfit.llm.engine.candidates import sampler_scratch_bytes

    w, d, batch = 3, 3, 4
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=batch, threads=1, speculative_model=DRAFT,
               speculative_tree=(w, d))
    target = spec.engine.runner
    steps: list[dict] = [{"draft": 0, "q": 0, "p": 0}]
    real_forward, real_attn = spec_tree_step.tree_forward, spec_tree_forward.TreeAttention.__init__
    real_q, real_p = spec_tree_step._draft_probs, spec.engine.spec.sampler.probs

    def attn_init(self, kv, chunks, *a, **k):
        real_attn(self, kv, chunks, *a, **k)
        if kv is target.kv:
            steps[-1]["masks"] = sum(m.nbytes for m in self.masks) + sum(c.anc.nbytes for c in chunks)
            steps[-1]["rows"], steps[-1]["context"] = len(chunks), max(c.base + c.count for c in chunks)

    def fwd(runner, chunks):
        logits = real_forward(runner, chunks)
        if runner is target:
            steps[-1]["verify"] = logits.nbytes
            steps.append({"draft": 0, "q": 0, "p": 0})
        else:
            steps[-1]["draft"] = max(steps[-1]["draft"], logits.nbytes)
        return logits

    def q_spy(dec, logits, rows):
        out = real_q(dec, logits, rows)
        steps[-1]["q"] += sum(v.nbytes for v in out.values())  # kept until the step's verdicts
        return out

    def p_spy(logits, params):
        out = real_p(logits, params)
        # one row at a time, after the verification pass, with the sampler's search beside it (within
        # sampler_scratch_bytes: tests/llm/engine/test_candidates.py measures that bound)
        scratch = sampler_scratch_bytes(*logits.shape)
        steps[-2]["p"] = max(steps[-2]["p"], out.nbytes + scratch)
        return out

    monkeypatch.setattr(spec_tree_step, "tree_forward", fwd)
    monkeypatch.setattr(spec_tree_step, "_draft_probs", q_spy)
    monkeypatch.setattr(spec.engine.spec.sampler, "probs", p_spy)
    monkeypatch.setattr(spec_tree_forward.TreeAttention, "__init__", attn_init)
    sp = SamplingParams(max_tokens=24, temperature=0.8 if sampled else 0, seed=1, ignore_eos=True)
    spec.generate(PROMPTS[:batch], sp)
    vocab = spec.engine.model_config.vocab_size
    full = [s for s in steps if s.get("rows") == batch and s["draft"]]
    assert full and (all(s["q"] and s["p"] for s in full) if sampled else not any(s["q"] for s in full))

    def measured(s: dict) -> int:  # drafting and verifying do not overlap: the larger phase (q is kept through both)
        return max(s["verify"] + s["masks"] + s["q"] + s["p"], s["draft"] + s["q"])

    for s in steps[:-1]:
        assert measured(s) <= accounting.tree_speculation_bytes(vocab, w, d, s["rows"], s["context"])
    if sampled:
        assert accounting.tree_speculation_bytes(vocab, w, d, batch, full[0]["context"]) <= 1.2 * measured(full[0])


def test_under_memory_pressure_the_tree_shrinks_before_anyone_is_preempted() -> None:
    """Two sequences in a KV budget that cannot hold both to the end: the tree's lookahead stops fitting first and
    the tree shrinks (narrower first) steps before the scheduler has to preempt; the output is plain decoding's."""
    prompt = " ".join(["word"] * 20)
    m = 40
    probe = LLM("memfit-tiny", dtype="float32", threads=1, max_num_seqs=2)
    n = len(probe.tokenizer.encode(prompt))
    budget = probe.engine.kv.bytes_needed(n + m) + probe.engine.kv.bytes_needed(n + m // 2)
    sp = SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
    want = tokens(probe.generate([prompt + s for s in "ab"], sp))
    spec = LLM("memfit-tiny", dtype="float32", threads=1, max_num_seqs=2, kv_budget=budget, kv_prefault=False,
               kv_eager_pages=0, enable_prefix_caching=False, speculative_model=DRAFT, speculative_tree=(4, 3))
    eng = spec.engine
    shapes: list[tuple[int, int]] = []
    real = spec_tree_step.tree_shape

    def spy(*a):
        shapes.append(real(*a))
        return shapes[-1]

    import memfit.llm.engine.spec_decode as spec_decode
    spec_decode.tree_shape, saved = spy, spec_decode.tree_shape
    try:
        ids = [eng.add_request(prompt + s, sp) for s in "ab"]
        outs, shrunk_before_preempt = run_noting_shrinks_before_preemption(eng)
    finally:
        spec_decode.tree_shape = saved
    assert shrunk_before_preempt is not None and shrunk_before_preempt > 0
    assert any(0 < w < 4 and d == 3 for w, d in shapes)  # narrower trees of full depth were used
    assert [outs[i].outputs[0].token_ids for i in ids] == want


def test_a_sessions_next_turn_reuses_the_drafts_kv_with_a_tree() -> None:
    """Turn 2 of a session repeats turn 1 and adds a message: the draft keeps its KV between the turns, as the target
    does (compacted to the text, so the next turn adopts it up to the common prefix); the output is the plain
    engine's."""
    m = 16
    sp = SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=2, threads=1, enable_prefix_caching=False)
    plain = LLM("memfit-tiny", **kw).engine
    spec_llm = LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(2, 3), **kw)
    spec = spec_llm.engine

    def run(eng, ids, held=None):
        rid = eng.add_request(prompt_token_ids=ids, params=sp, session_id="s")
        if held is not None:  # adopted before the first step: the draft starts from the previous turn's KV
            assert spec.spec.draft_kv.stats().tokens_held >= held
        return run_until_finished(eng, rid)

    turn1 = spec_llm.tokenizer.encode(" ".join(["story"] * 60))
    answer = run(spec, turn1)
    assert answer == run(plain, turn1)
    assert spec.spec.stats.accepted > 0
    turn2 = turn1 + answer + spec_llm.tokenizer.encode(" and then")
    assert run(spec, turn2, held=len(turn1)) == run(plain, turn2)
    spec.end_session("s")
    spec.step()
    assert spec.spec.draft_kv.stats().tokens_held == 0  # the session ended: the draft's KV went with the target's


def test_greedy_bfloat16_differs_only_at_near_ties() -> None:
    """bf16: a tree pass runs PyTorch's masked attention and the model's batched layers, where plain decoding runs
    the decode kernels one token a row, so an exact near-tie of the target's top two logits may go either way.
    Count such divergences and bound them; any divergence elsewhere fails."""
    sp = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    want = LLM("memfit-tiny", dtype="bfloat16", max_num_seqs=6, threads=1).generate(PROMPTS, sp)
    spec = LLM("memfit-tiny", dtype="bfloat16", max_num_seqs=6, threads=1, speculative_model=DRAFT,
               speculative_tree=(3, 3))
    got = spec.generate(PROMPTS, sp)
    diverged = near_tie_divergences(got, want)
    assert diverged <= 2, f"{diverged} of {len(PROMPTS)} sequences diverged"
    assert spec.engine.stats()["speculative"]["spec_accepted"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_greedy_float32_identical_on_cuda(kv_cache: str) -> None:
    """The same lossless check on a GPU: the tree, its masks and the compaction on the device."""
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache=kv_cache, max_num_seqs=4, device="cuda")
    want = LLM("memfit-tiny", **kw).generate(PROMPTS[:4], sp)
    spec = LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(3, 3), **kw)
    assert tokens(spec.generate(PROMPTS[:4], sp)) == tokens(want)
    assert spec.engine.stats()["speculative"]["spec_accepted"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampled_trees_on_cuda_are_reproducible() -> None:
    """Sampled trees on a GPU: q, p and the uniforms on the device (the generators stay on the CPU); fixed seeds give
    the same tokens twice, all in the vocabulary, with drafts accepted."""
    sp = [SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=s, ignore_eos=True) for s in range(4)]
    kw = dict(dtype="float32", max_num_seqs=4, device="cuda", speculative_model=DRAFT, speculative_tree=(3, 3))
    runs = [LLM("memfit-tiny", **kw) for _ in "ab"]
    got = [tokens(llm.generate(PROMPTS[:4], sp)) for llm in runs]
    assert got[0] == got[1]
    vocab = runs[0].engine.model_config.vocab_size
    assert all(0 <= x < vocab for t in got[0] for x in t) and [len(t) for t in got[0]] == [24] * 4
    assert runs[0].engine.stats()["speculative"]["spec_accepted"] > 0


def test_a_one_branch_tree_runs_as_a_chain(monkeypatch) -> None:
    """W = 1 (given, or shrunk to under pressure) is a chain: it takes the chain's passes (the C++ decode stack
    where there is one), never a tree pass, and decodes as plain decoding."""
    import memfit.llm.engine.spec_decode as spec_decode

    def no_tree(*a, **k):
        raise AssertionError("a one-branch tree went through a tree pass")

    monkeypatch.setattr(spec_decode, "speculate_tree", no_tree)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=4, threads=1)
    spec = LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(1, 3), **kw)
    assert tokens(spec.generate(PROMPTS[:4], sp)) == tokens(LLM("memfit-tiny", **kw).generate(PROMPTS[:4], sp))
    assert spec.engine.stats()["speculative"]["spec_accepted"] > 0


def test_tree_or_chain_picks_the_faster_kind_and_probes_the_other() -> None:
    """TreeOrChain from given rates (tokens per second of decode-only steps): unmeasured kinds first, then the faster
    one, the slower one re-measured every probe_every steps."""
    pick = spec_tree_step.TreeOrChain(probe_every=4, window=3)
    assert pick.choose() is True  # trees unmeasured
    pick.observe(True, 10, 1.0)
    assert pick.choose() is False  # chains unmeasured
    pick.observe(False, 30, 1.0)
    got = [pick.choose() for _ in range(8)]  # steps 3..10: chains, with a tree probe at steps 4 and 8
    assert got == [False, True, False, False, False, True, False, False]
    for _ in range(3):
        pick.observe(True, 90, 1.0)  # trees got faster: the median of the last 3 follows
    assert pick.choose() is True
    assert pick.counts == {"tree": 4, "chain": 7}


def test_adaptive_tree_engine_follows_the_measured_rates_and_stays_lossless(monkeypatch) -> None:
    """speculative_adaptive with a tree: greedy output equals plain decoding; with trees measured slower (rates
    injected, not timed) the engine runs chains and only probes trees; with trees faster, trees."""
    from memfit.llm.engine.spec_decode import PROBE_EVERY

    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=4, threads=1)
    want = tokens(LLM("memfit-tiny", **kw).generate(PROMPTS[:4], sp))
    for tree_rate, chain_rate in ((1.0, 100.0), (100.0, 1.0)):
        spec = LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(3, 3), speculative_adaptive=True, **kw)
        chooser = spec.engine.spec.chooser
        chooser.observe(True, int(tree_rate), 1.0)
        chooser.observe(False, int(chain_rate), 1.0)
        monkeypatch.setattr(chooser, "observe", lambda *a: None)  # the injected rates stay
        assert tokens(spec.generate(PROMPTS[:4], sp)) == want
        st = spec.engine.stats()["speculative"]
        slow, fast = ("tree_steps", "chain_steps") if tree_rate < chain_rate else ("chain_steps", "tree_steps")
        assert st[fast] > 0 and st[slow] <= st[fast] // (PROBE_EVERY - 1) + 1  # probes only
        assert st["spec_accepted"] > 0
