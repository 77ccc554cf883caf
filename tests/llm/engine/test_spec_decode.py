"""Speculative decoding in the engine (engine/spec_decode.py) on the bundled pair memfit-tiny / memfit-tiny-draft:
greedy output identical to plain decoding, sampled output distributed as the target's, KV of rejected drafts
truncated (checked against the kernel's page tables), and the errors at start."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from memfit.llm.engine.api import LLM
from memfit.llm.engine.config import EngineConfig
from memfit.llm.engine.draft import SpeculativeConfigError
from memfit.llm.engine.params import SamplingParams
from tests.llm.engine import chi2
from tests.llm.engine.spec_helpers import (DRAFT, PROMPTS, near_tie_divergences,
                                          run_noting_shrinks_before_preemption, run_until_finished, tokens)
from tests.llm.kv.kernel_pages import PAGE, arena_pages, arena_resident_bytes
from tests.llm.tiny_models import build_tiny_hf_model, save_hf_model



@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_greedy_float32_identical_to_plain_decoding_batched(kv_cache: str) -> None:
    sp = SamplingParams(max_tokens=40, temperature=0)  # eos may stop a sequence inside a verified run
    plain = LLM("memfit-tiny", dtype="float32", kv_cache=kv_cache, max_num_seqs=4, threads=1)
    want = plain.generate(PROMPTS, sp)
    spec = LLM("memfit-tiny", dtype="float32", kv_cache=kv_cache, max_num_seqs=4, threads=1,
               speculative_model=DRAFT, num_speculative_tokens=3)
    got = spec.generate(PROMPTS, sp)
    assert tokens(got) == tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    st = spec.engine.stats()["speculative"]
    assert st["spec_steps"] > 0 and st["spec_accepted"] > 0  # it did speculate, and kept some drafts
    assert st["tokens_per_seq_step"] > 1.0
    assert st["draft_kv_tokens_held"] == 0  # finished sequences gave their draft KV back


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_plain_rows_in_a_verification_pass_decode_as_plain_decoding(kv_cache: str) -> None:
    """A sequence's last token is decoded with g = 0 (more drafts would pass max_tokens): with other sequences
    speculating it rides in their verification pass. Greedy and seeded sampled requests of staggered lengths."""
    prompts = PROMPTS[:4]
    greedy = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 8, 17, 30)]
    kw = dict(dtype="float32", kv_cache=kv_cache, max_num_seqs=4, threads=1)
    plain = LLM("memfit-tiny", **kw)
    spec = LLM("memfit-tiny", **kw, speculative_model=DRAFT, num_speculative_tokens=3)
    assert tokens(spec.generate(prompts, greedy)) == tokens(plain.generate(prompts, greedy))
    st = spec.engine.stats()["speculative"]
    assert st["spec_folded_plain"] > 0 and st["draft_kv_tokens_held"] == 0
    sampled = [SamplingParams(max_tokens=m, temperature=1.0, seed=7 + m, ignore_eos=True) for m in (2, 6, 11, 25)]
    outs = spec.generate(prompts, sampled)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 6, 11, 25]
    assert spec.engine.stats()["speculative"]["spec_folded_plain"] > st["spec_folded_plain"]


def test_greedy_bfloat16_differs_only_at_near_ties() -> None:
    """bf16 verification runs a (g+1)-token chunk where plain decoding runs one token. Through the decode stack
    both run the same kernels row by row (test_spec_forward.py: bit for bit with blocked matmuls); where another
    path runs (no stack, a rounding that depends on the batch), an exact near-tie of the target's top two logits
    may go either way. Count such divergences and bound them; any divergence elsewhere fails."""
    sp = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    plain = LLM("memfit-tiny", dtype="bfloat16", max_num_seqs=6, threads=1)
    want = plain.generate(PROMPTS, sp)
    spec = LLM("memfit-tiny", dtype="bfloat16", max_num_seqs=6, threads=1, speculative_model=DRAFT,
               num_speculative_tokens=4)
    got = spec.generate(PROMPTS, sp)
    diverged = near_tie_divergences(got, want)
    assert diverged <= 1, f"{diverged} of {len(PROMPTS)} sequences diverged"


def _top_k_dist(llm: LLM, prefix: list[int], k: int) -> dict[int, float]:
    """The target's distribution after `prefix` under temperature 1, top-k k: its top-k probabilities renormalised."""
    out = llm.generate(prompt_token_ids=[prefix], sampling_params=SamplingParams(max_tokens=1, temperature=0, logprobs=k))
    top = out[0].outputs[0].logprobs[0].top
    z = sum(torch.tensor(list(top.values())).exp().tolist())
    return {t: float(torch.tensor(v).exp()) / z for t, v in top.items()}


def test_sampled_output_has_the_target_distribution_chi_square() -> None:
    """1200 seeded requests, temperature 1, top-k 4 (a 4-token vocabulary per position). Token 0 comes from the
    prefill's plain sampling, token 1 from the first verification (an accepted draft, a resample from
    norm(max(0, p - q)) or the bonus token); their joint law must be the target's p(t0) p(t1 | t0), and so must
    token 2's given the most common (t0, t1)."""
    k, n = 4, 1200
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=64, threads=1, speculative_model=DRAFT,
               num_speculative_tokens=2)
    prompt = spec.tokenizer.encode("Once upon a time")
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=k, seed=i, ignore_eos=True) for i in range(n)]
    outs = spec.generate(prompt_token_ids=[prompt] * n, sampling_params=params)
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    st = spec.engine.stats()["speculative"]
    assert 0.0 < st["acceptance_rate"] < 1.0  # the draft differs from the target: the rule is exercised
    plain = LLM("memfit-tiny", dtype="float32", threads=1)
    p0 = _top_k_dist(plain, prompt, k)
    pairs = Counter(s[:2] for s in seqs)
    cells, expected = [], []
    for t0, w0 in p0.items():
        for t1, w1 in _top_k_dist(plain, prompt + [t0], k).items():
            cells.append(pairs.get((t0, t1), 0))
            expected.append(n * w0 * w1)
    assert sum(cells) == n  # nothing outside the target's top-k support
    assert chi2.fits(cells, expected), (cells, expected)
    (t0, t1), m = pairs.most_common(1)[0]
    p2 = _top_k_dist(plain, prompt + [t0, t1], k)
    third = Counter(s[2] for s in seqs if s[:2] == (t0, t1))
    assert sum(third[t] for t in p2) == m
    assert chi2.fits([third[t] for t in p2], [m * w for w in p2.values()])


def test_rejected_drafts_leave_no_kv_and_pages_match_the_kernel() -> None:
    """After every step, each cache holds K/V for exactly the tokens the sequence has (target: num_computed;
    draft: at most that), and the pages the kernel holds for a sequence's slot (from /proc/self/pagemap) cover
    its tokens plus at most the g lookahead tokens, never the rejected drafts of earlier steps."""
    g = 4
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1, speculative_model=DRAFT,
               num_speculative_tokens=g, kv_prefault=False, kv_eager_pages=0, enable_prefix_caching=False)
    eng = spec.engine
    sp = SamplingParams(max_tokens=64, temperature=0.8, seed=5, ignore_eos=True)
    for p in PROMPTS[:4]:
        eng.add_request(p, sp)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        for seq in eng.scheduler.running:
            assert eng.kv.num_tokens(seq.seq_id) == seq.num_computed
            if eng.spec.draft_kv.has_seq(seq.seq_id):  # from the sequence's first verification on
                assert eng.spec.draft_kv.num_tokens(seq.seq_id) <= seq.num_computed
            pages = int(arena_pages(eng.kv)[eng.kv.slot_of(seq.seq_id)].sum())
            assert pages * PAGE >= eng.kv.bytes_needed(seq.num_computed)
            assert pages * PAGE <= eng.kv.bytes_needed(seq.num_tokens + g)
    st = eng.stats()["speculative"]
    assert st["spec_proposed"] > st["spec_accepted"]  # there were rejections to roll back
    assert steps < 4 * 64  # fewer target passes than tokens
    assert st["draft_kv_tokens_held"] == 0


def test_ledger_counts_the_draft() -> None:
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1, speculative_model=DRAFT)
    eng = spec.engine
    owners = eng.ledger.by_owner()
    assert owners["draft_weights"] > 0 and owners["draft_step"] > 0
    # The two KV shares are set aside side by side and together fit what the ledger left.
    assert eng.kv_budget.limit_bytes + eng.spec.draft_kv.budget.limit_bytes <= eng.ledger.limit_bytes - eng.ledger.used_bytes
    eng.add_request("Once upon a time", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    eng.step(), eng.step()  # the prefill, then the first verification (the draft prefills then)
    held = eng.ledger.by_owner().get("draft_kv_budget", 0)
    assert held >= eng.spec.draft_kv.stats().committed_bytes > 0
    assert spec.engine.config.num_speculative_tokens == 4  # the default with a draft


def test_kv_budget_caps_the_drafts_share_at_the_targets_tokens() -> None:
    """Under --kv-budget the draft's KV share was a fraction of the whole ledger: 131072 tokens against the
    target's 2048 at 4 MiB. It drafts only for sequences the target holds, so it gets at most the target's tokens."""
    kw = dict(dtype="float32", kv_budget="4MiB", max_model_len=2048, threads=1)
    spec = LLM("memfit-tiny", **kw, speculative_model=DRAFT)
    eng = spec.engine
    target_tokens = eng.kv_budget.limit_bytes // eng.layout.bytes_per_token
    draft = eng.spec.draft_kv
    assert target_tokens == 4 * 2**20 // eng.layout.bytes_per_token
    assert draft.budget.limit_bytes // draft.layout.bytes_per_token <= target_tokens
    sp = SamplingParams(max_tokens=40, temperature=0)  # and it still speculates, losslessly
    assert tokens(spec.generate(PROMPTS[:2], sp)) == tokens(LLM("memfit-tiny", **kw).generate(PROMPTS[:2], sp))
    assert eng.stats()["speculative"]["spec_accepted"] > 0


def test_an_idle_engine_gives_the_draft_kv_pages_back() -> None:
    """Freed draft slots keep their pages for the next sequence (deferred reclamation), as the target's do; once
    idle for kv_reclaim_idle_s both go back. Counted by the kernel's page map, not the caches' counters (the
    draft's were never given back before: 3.6 MB stayed on an idle server)."""
    llm = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1, speculative_model=DRAFT,
              num_speculative_tokens=3, kv_prefault=False)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    draft, target = llm.engine.spec.draft_kv, llm.engine.kv
    assert arena_resident_bytes(draft) > 0  # finished: the draft's slots still hold their pages
    llm.engine.maintain(now=time.monotonic() + llm.engine.config.kv_reclaim_idle_s + 1)
    assert arena_resident_bytes(draft) == 0
    assert arena_resident_bytes(target) == 0


def test_gamma_below_one_is_refused_at_start() -> None:
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            LLM("memfit-tiny", speculative_model=DRAFT, num_speculative_tokens=bad)
    with pytest.raises(ValueError, match="needs a speculative_model"):
        EngineConfig(num_speculative_tokens=3)


def test_draft_with_another_vocabulary_is_refused(tmp_path) -> None:
    model, tok = build_tiny_hf_model("llama", seed=1)  # a 320-token vocabulary
    path = save_hf_model(model, tok, tmp_path / "other-vocab")
    with pytest.raises(SpeculativeConfigError, match="vocabulary of 320 tokens"):
        LLM("memfit-tiny", speculative_model=str(path))


def test_draft_with_another_tokenizer_of_the_same_size_is_refused(tmp_path) -> None:
    model, tok = build_tiny_hf_model("llama", seed=1)
    target = save_hf_model(model, tok, tmp_path / "target")
    draft = save_hf_model(model, tok, tmp_path / "draft")
    spec = json.loads((draft / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, other meaning
    (draft / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SpeculativeConfigError, match="tokenizer differs"):
        LLM(str(target), speculative_model=str(draft))


def test_self_draft_of_all_layers_accepts_every_draft() -> None:
    """A self-draft of all the target's layers is the target: every greedy draft must be accepted, and a
    sequence gains g + 1 tokens per target pass (an off-by-one in the verified positions would show here)."""
    g = 3
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1, speculative_model="self:4",
               num_speculative_tokens=g)
    sp = SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)  # 1 from the prefill + 8 passes of 4
    got = spec.generate(PROMPTS[:2], sp)
    want = LLM("memfit-tiny", dtype="float32", max_num_seqs=2, threads=1).generate(PROMPTS[:2], sp)
    assert tokens(got) == tokens(want)
    st = spec.engine.stats()["speculative"]
    assert st["acceptance_rate"] == 1.0 and st["tokens_per_seq_step"] == g + 1
    assert spec.engine.ledger.by_owner().get("draft_weights", 0) == 0  # it shares the target's weights


def test_self_draft_of_the_first_layers_is_lossless() -> None:
    sp = SamplingParams(max_tokens=24, temperature=0)
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1, speculative_model="self")
    want = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1).generate(PROMPTS[:4], sp)
    assert tokens(spec.generate(PROMPTS[:4], sp)) == tokens(want)
    assert spec.engine.spec.draft_kv.layout.num_layers == 2  # half of memfit-tiny's 4


@pytest.mark.parametrize("name", ["self:0", "self:5", "self:two"])
def test_self_draft_layer_count_out_of_range_is_refused(name: str) -> None:
    with pytest.raises(SpeculativeConfigError, match="self-draft takes 1 to 4"):
        LLM("memfit-tiny", speculative_model=name)


def test_fit_predicts_what_the_engine_reserves_for_the_draft() -> None:
    """`memfit fit --speculative-model` adds up the same parts the engine reserves (engine/draft.py)."""
    from memfit.llm.engine.fit import predict_for_engine

    llm = LLM("memfit-tiny", max_num_seqs=4, max_model_len=256, max_num_batched_tokens=128, threads=1,
              speculative_model=DRAFT, num_speculative_tokens=5)
    b = predict_for_engine("memfit-tiny", 256, 4, 128, measure_runtime=False, speculative_model=DRAFT,
                           num_speculative_tokens=5)
    owners = llm.engine.ledger.by_owner()
    assert owners["draft_weights"] == b.draft_weights_bytes > 0
    assert owners["draft_step"] == b.draft_step_bytes + b.speculation_bytes


def test_long_prompts_prefill_the_draft_in_steps_of_the_token_budget() -> None:
    """The draft's first sight of a prompt is prefilled in passes of at most max_num_batched_tokens tokens (the
    step the ledger reserved); the output stays the target's greedy output."""
    prompts = [" ".join(["word"] * 90) + str(i) for i in range(3)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=3, max_num_batched_tokens=40, threads=1)
    want = LLM("memfit-tiny", **kw).generate(prompts, sp)
    spec = LLM("memfit-tiny", speculative_model=DRAFT, num_speculative_tokens=3, **kw)
    widest = []
    real = spec.engine.spec.draft.model.forward
    spec.engine.spec.draft.model.forward = lambda ids, pos, attn: (widest.append(attn.num_real), real(ids, pos, attn))[1]
    assert tokens(spec.generate(prompts, sp)) == tokens(want)
    assert widest and max(widest) <= 40
    assert len(spec.tokenizer.encode(prompts[0])) > 40  # so a prompt alone is wider than a step


def test_adaptive_gamma_is_lossless_and_measures_its_costs() -> None:
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1).generate(PROMPTS[:4], sp)
    spec = LLM("memfit-tiny", dtype="float32", max_num_seqs=4, threads=1, speculative_model=DRAFT,
               num_speculative_tokens=4, speculative_adaptive=True)
    assert tokens(spec.generate(PROMPTS[:4], sp)) == tokens(want)
    st = spec.engine.stats()["speculative"]
    assert st["adaptive"] and st["spec_seq_steps"] > 0 and st["draft_cost"] > 0 and st["verify_cost"] > 0


def test_adaptive_gamma_picks_plain_decoding_when_it_is_faster_and_probes() -> None:
    from memfit.llm.engine.request import Sequence
    from memfit.llm.engine.spec_decode import PROBE_EVERY

    dec = LLM("memfit-tiny", threads=1, speculative_model=DRAFT, num_speculative_tokens=4,
              speculative_adaptive=True).engine.spec
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    assert dec._want(seq) == 4  # no cost measured yet: speculate, to time it
    dec._t = {"draft": 0.05, "verify": 1.0, "plain": 1.0}  # seconds: costs in plain steps 0.05 and 1
    dec._trackers[seq.seq_id].update(0, 4)  # rejected at once, several times: acceptance falls
    dec._trackers[seq.seq_id].update(0, 4)
    dec._trackers[seq.seq_id].update(0, 4)
    dec._t["draft"] = 1.0  # a draft pass as dear as a target pass
    picks = [dec._want(seq) for _ in range(PROBE_EVERY)]
    assert picks == [0] * (PROBE_EVERY - 1) + [1]  # plain decoding, and a one-draft probe to re-measure
    for _ in range(20):
        dec._trackers[seq.seq_id].update(4, 4)  # the draft starts agreeing
    dec._t["draft"] = 0.05
    assert dec._want(seq) == 4


def test_adaptive_cost_estimates_ignore_a_delayed_step() -> None:
    """One step another process delayed 50x must not move the estimate (a 0.8/0.2 moving average would put the
    plain step at 10.8 ms and speculation at a tenth of its cost)."""
    from memfit.llm.engine.spec_decode import COST_WINDOW

    dec = LLM("memfit-tiny", threads=1, speculative_model=DRAFT, num_speculative_tokens=2,
              speculative_adaptive=True).engine.spec
    for _ in range(COST_WINDOW - 1):
        dec._observe("plain", 0.001)
        dec._time(0.0008, 2, 0.0012)  # two draft passes of 0.4 ms, a verification of 1.2 ms
    dec._observe("plain", 0.050)
    draft, verify = dec.costs()
    assert draft == pytest.approx(0.4) and verify == pytest.approx(1.2)


def test_adaptive_needs_a_draft() -> None:
    with pytest.raises(ValueError, match="speculative_adaptive"):
        EngineConfig(speculative_adaptive=True)


def test_under_memory_pressure_gamma_shrinks_before_anyone_is_preempted() -> None:
    """Two sequences in a KV budget that cannot hold both to the end: the lookahead stops fitting first, and g
    shrinks (spec_shrunk) steps before the scheduler has to preempt."""
    prompt = " ".join(["word"] * 20)
    m = 40
    probe = LLM("memfit-tiny", dtype="float32", threads=1)
    n = len(probe.tokenizer.encode(prompt))  # the suffix adds a token or two: the budget falls short of both
    budget = probe.engine.kv.bytes_needed(n + m) + probe.engine.kv.bytes_needed(n + m // 2)
    spec = LLM("memfit-tiny", dtype="float32", threads=1, max_num_seqs=2, kv_budget=budget, kv_prefault=False,
               kv_eager_pages=0, enable_prefix_caching=False, speculative_model=DRAFT, num_speculative_tokens=4)
    eng = spec.engine
    sp = SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
    ids = [eng.add_request(prompt + s, sp) for s in "ab"]
    outs, shrunk_before_preempt = run_noting_shrinks_before_preemption(eng)
    assert shrunk_before_preempt is not None and shrunk_before_preempt > 0
    assert [len(outs[i].outputs[0].token_ids) for i in ids] == [m, m]


def test_a_sessions_next_turn_reuses_the_drafts_kv() -> None:
    """Turn 2 of a session repeats turn 1 and adds a message: the draft keeps its KV between the turns, as the
    target does, so it only catches up on the new tokens; the output is the plain engine's."""
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=2, threads=1, enable_prefix_caching=False)
    plain = LLM("memfit-tiny", **kw).engine
    spec_llm = LLM("memfit-tiny", speculative_model=DRAFT, num_speculative_tokens=3, **kw)
    spec = spec_llm.engine
    fed = []  # tokens of each draft pass, through the model's forward or memfit's C++ decode stack
    real = spec.spec.draft.model.forward
    spec.spec.draft.model.forward = lambda ids, pos, attn: (fed.append(attn.num_real), real(ids, pos, attn))[1]
    stack = spec.spec.draft.stack  # AVX-512 hosts: short passes (one-token steps, short catch-ups) go here
    if stack is not None:
        run_stack = stack.run
        stack.run = lambda ids, plan, counts=None: (fed.append(len(ids)), run_stack(ids, plan, counts))[1]

    def run(eng, ids):
        rid = eng.add_request(prompt_token_ids=ids, params=sp, session_id="s")
        return run_until_finished(eng, rid)

    turn1 = spec_llm.tokenizer.encode(" ".join(["story"] * 60))
    answer = run(spec, turn1)
    assert answer == run(plain, turn1)
    assert spec.spec.draft_kv.stats().tokens_held >= len(turn1)  # kept for the next turn
    fed.clear()
    turn2 = turn1 + answer + spec_llm.tokenizer.encode(" and then")
    assert run(spec, turn2) == run(plain, turn2)
    new = len(turn2) - len(turn1)  # the answer and the new message
    # The draft's catch-up: not the whole conversation again (> 60 tokens). Only the multi-token passes (prefill
    # and catch-up) are summed, one-token proposal steps left out; no pass may hold the conversation.
    assert fed and sum(n for n in fed if n > 1) <= new and max(fed) <= new, (fed, new)
    spec.end_session("s")
    spec.step()
    assert spec.spec.draft_kv.stats().tokens_held == 0  # the session ended: the draft's KV went with the target's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_greedy_float32_identical_on_cuda(kv_cache: str) -> None:
    """The same lossless check on a GPU: every tensor of the speculative step (drafts, distributions, the
    rejection sampler) lives on the device; only the random draws are made on the CPU."""
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache=kv_cache, max_num_seqs=4, device="cuda")
    want = LLM("memfit-tiny", **kw).generate(PROMPTS[:4], sp)
    spec = LLM("memfit-tiny", speculative_model=DRAFT, num_speculative_tokens=3, **kw)
    assert tokens(spec.generate(PROMPTS[:4], sp)) == tokens(want)
    assert spec.engine.stats()["speculative"]["spec_accepted"] > 0


def test_logprobs_are_the_targets_at_every_emitted_token() -> None:
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    kw = dict(dtype="float32", max_num_seqs=2, threads=1)
    want = LLM("memfit-tiny", **kw).generate(PROMPTS[:2], sp)
    got = LLM("memfit-tiny", speculative_model=DRAFT, num_speculative_tokens=3, **kw).generate(PROMPTS[:2], sp)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.outputs[0].logprobs) == len(w.outputs[0].logprobs) == 24
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
            assert list(a.top) == list(b.top)
