"""A 2-rank engine (rank 0 schedules, the worker replays its KV calls and runs its shard) decodes the tokens a
1-rank engine does: float32 on the CPU with gloo, across chunked prefill, batches that change shape, prefix-cache
hits and aborts. Near-ties (the 1-rank model's top two logits within float32 rounding) are excepted, counted
and bounded."""
from __future__ import annotations

import pytest
import torch

from memfit.llm import LLM, SamplingParams
from memfit.llm.parallel.mirror import RecordingKV, ReplayMismatch, replay
from tests.llm.tiny_models import build_tiny_hf_model, save_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTS = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, threads=1)
# Longer than one KV page at either model's per-rank layout (64 tokens for the tiny qwen2): prefix-cache hits.
SHARED = torch.randint(3, 300, (70,), generator=torch.Generator().manual_seed(1)).tolist()


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    out = [[5, 17, 33], [100, 7], list(range(40, 77)), SHARED + [250 % vocab, 11], SHARED + [12, 13, 14]]
    out += [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 50, 21)]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model, tok = build_tiny_hf_model("qwen2", seed=7)  # q/k/v biases, tied embeddings
    return {"memfit-tiny": "memfit-tiny", "qwen2": str(save_hf_model(model, tok, tmp_path_factory.mktemp("tp") / "q"))}


def near_tie_or_fail(one: LLM, prompt: list[int], a: list[int], b: list[int]) -> bool:
    """True where a and b first differ after a step whose top two logits (1-rank model, float32) are tied to
    rounding; fails the test for a real difference. Identical lists: False."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            with torch.no_grad():
                logits = one.engine.model.dense_logits(torch.tensor([prompt + a[:i]]))[0, -1].float()
            gap = (logits[x] - logits[y]).abs().item()
            assert gap < 1e-4 * max(1.0, logits.abs().max().item()), f"token {i}: {x} != {y}, logit gap {gap}"
            return True
    assert len(a) == len(b)
    return False


def greedy_near_ties(one: LLM, two: LLM, ps: list[list[int]]) -> int:
    """24 greedy tokens of each prompt from both engines; the number of prompts where they part at a near-tie
    (near_tie_or_fail fails the test on any other difference)."""
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=ps, sampling_params=sp)]
    got = two.generate(prompt_token_ids=ps, sampling_params=sp)
    return sum(near_tie_or_fail(one, p, r, o.outputs[0].token_ids) for p, r, o in zip(ps, ref, got))


@pytest.mark.parametrize("name", ["memfit-tiny", "qwen2"])
def test_two_ranks_decode_the_one_rank_tokens(models, name):
    path = models[name]
    one = LLM(model=path, **OPTS)
    two = LLM(model=path, tensor_parallel_size=2, **OPTS)
    try:
        ps = prompts(one.engine.model_config.vocab_size)
        for _ in range(2):  # the second round hits the prefix cache of the first
            ties = greedy_near_ties(one, two, ps)
            assert ties <= 1, f"{ties} near-ties in {len(ps)} prompts"
        assert two.engine.kv.prefix_stats.hit_tokens > 0  # the shared prompt was served from the cache
        # each rank holds half the KV heads: rank 0's cache is laid out for 1/2 of them
        assert two.engine.layout.bytes_per_token * 2 == one.engine.layout.bytes_per_token
    finally:
        two.engine.close()
        one.engine.close()


def test_abort_mid_flight_keeps_ranks_in_step(models):
    """Requests aborted between steps free their KV on rank 0; the worker replays the frees with the next step,
    and the survivors decode as without TP."""
    two = LLM(model="memfit-tiny", tensor_parallel_size=2, **OPTS)
    one = LLM(model="memfit-tiny", **OPTS)
    try:
        ps = prompts(4096)
        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        ids = [two.engine.add_request(prompt_token_ids=p, params=sp) for p in ps]
        for _ in range(3):
            two.engine.step()
        for rid in ids[::2]:
            two.engine.abort(rid)
        done = {}
        while two.engine.has_unfinished_requests():
            done.update({o.request_id: o for o in two.engine.step() if o.finished})
        ref = one.generate(prompt_token_ids=ps[1::2], sampling_params=sp)
        for rid, r, p in zip(ids[1::2], ref, ps[1::2]):
            assert not near_tie_or_fail(one, p, r.outputs[0].token_ids, done[rid].outputs[0].token_ids)
    finally:
        two.engine.close()
        one.engine.close()


class _FakeKV:
    def __init__(self) -> None:
        self.held: dict[int, int] = {}

    def try_allocate(self, seq_id: int, n: int) -> bool:
        if sum(self.held.values()) + n > 10:
            return False
        self.held[seq_id] = n
        return True

    def free(self, seq_id: int) -> None:
        self.held.pop(seq_id, None)

    def stats(self) -> str:
        return "not logged"


def test_replay_repeats_the_log_and_catches_divergence():
    rank0, worker = _FakeKV(), _FakeKV()
    rec = RecordingKV(rank0)
    assert rec.try_allocate(1, 6) and not rec.try_allocate(2, 6)
    rec.free(1)
    assert rec.stats() == "not logged"
    log = rec.take_log()
    assert [op[0] for op in log] == ["try_allocate", "try_allocate", "free"] and rec.take_log() == []
    replay(worker, log, 1)
    assert worker.held == rank0.held == {}
    worker.held[9] = 8  # the worker's cache is fuller than rank 0's: the same call would now fail
    with pytest.raises(ReplayMismatch, match="caches diverged"):
        replay(worker, [("try_allocate", (3, 5), True)], 1)


def test_batched_speculation_across_ranks(models):
    """The draft runs on rank 0 only and proposes for the whole batch; the target's verification pass runs on both
    ranks (StepMessage.chunks). Greedy speculation is lossless: the tokens are plain decoding's at N = 1."""
    one = LLM(model="memfit-tiny", **OPTS)
    two = LLM(model="memfit-tiny", tensor_parallel_size=2, speculative_model="memfit-tiny-draft",
              num_speculative_tokens=3, **OPTS)
    try:
        ps = prompts(4096)
        assert greedy_near_ties(one, two, ps) <= 1
        spec = two.engine.stats()["speculative"]
        assert spec["spec_accepted"] > 0 and spec["spec_steps"] > 0, spec
        assert two.engine.tp.procs[0].exitcode is None  # the worker verified every pass without diverging
    finally:
        two.engine.close()
        one.engine.close()


def test_token_trees_across_ranks(models):
    """Tree speculation under TP: rank 0 drafts the trees and walks the verdicts; the verification pass over every
    node runs on both ranks (StepMessage.trees), and each accepted path's K/V is moved into place on both (logged as
    COMPACT, replayed before the truncations after it). Greedy: plain decoding's tokens at N = 1 (a worker that
    skipped the compaction would attend to rejected nodes' K/V and drift); sampled requests draft trees too and a
    seed reproduces its tokens."""
    one = LLM(model="memfit-tiny", **OPTS)
    two = LLM(model="memfit-tiny", tensor_parallel_size=2, speculative_model="memfit-tiny-draft",
              speculative_tree=(3, 2), **OPTS)
    try:
        ps = prompts(4096)
        assert greedy_near_ties(one, two, ps) <= 1
        spec = two.engine.stats()["speculative"]
        assert spec["tree"] == [3, 2] and spec["spec_accepted"] > 0 and spec["spec_steps"] > 0, spec
        sampled = [SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True) for i in range(4)]
        runs = [[o.outputs[0].token_ids for o in two.generate(prompt_token_ids=ps[:4], sampling_params=sampled)]
                for _ in range(2)]
        assert runs[0] == runs[1] and all(len(t) == 12 for t in runs[0])
        assert two.engine.stats()["speculative"]["spec_steps"] > spec["spec_steps"]
        assert two.engine.tp.procs[0].exitcode is None  # the worker verified every pass without diverging
    finally:
        two.engine.close()
        one.engine.close()


def test_self_draft_is_refused_under_tp():
    with pytest.raises(ValueError, match="self-draft .* does not run under --tensor-parallel-size"):
        LLM(model="memfit-tiny", tensor_parallel_size=2, speculative_model="self:2")


def test_preemption_under_a_tight_kv_budget_keeps_ranks_in_step():
    """A per-rank KV budget that holds only part of the batch: rank 0 preempts (recompute) and readmits, the
    worker replays every free and allocation, and the tokens are those of one rank with the same capacity (half
    the KV heads per rank: half the bytes)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 4000, (int(n),), generator=g).tolist() for n in torch.randint(20, 120, (12,), generator=g)]
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    opts = dict(dtype="float32", threads=1, max_num_seqs=8)
    one = LLM(model="memfit-tiny", kv_budget="1MiB", **opts)
    two = LLM(model="memfit-tiny", kv_budget="512KiB", tensor_parallel_size=2, **opts)
    try:
        ref = one.generate(prompt_token_ids=ps, sampling_params=sp)
        got = two.generate(prompt_token_ids=ps, sampling_params=sp)
        assert two.engine.stats()["preemptions_by_mode"]["recompute"] > 0
        ties = sum(near_tie_or_fail(one, p, r.outputs[0].token_ids, o.outputs[0].token_ids)
                   for p, r, o in zip(ps, ref, got))
        assert ties <= 1
    finally:
        two.engine.close()
        one.engine.close()
