"""The model runner marks the steps that carry prefill rows (kernels/large_m.py): only those may run their
many-row matmuls on the kernel chosen at run time; a pure decode step, however many rows, never does."""
from __future__ import annotations

import torch

from memfit.llm.engine.api import LLM
from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.runner import ModelRunner
from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import LARGE_M, BlockedLinear
from tests.llm.kernels.common import need
from tests.llm.tiny_models import make_tiny_model_dir


def test_decode_steps_never_take_the_prefill_kernel_choice(tmp_path, monkeypatch):
    """70 sequences (more rows than the decode stack takes, so their decode steps run layer by layer through
    BlockedLinear with 70 rows): the chosen-kernel path runs in the prefill step only, and greedy tokens equal
    those of the same engine with the choice pinned to the decode kernel."""
    need(torch.bfloat16)
    path = make_tiny_model_dir(tmp_path, dtype="bfloat16")
    steps: list[tuple[int, int]] = []  # (decode rows, all rows) of each step the runner ran
    many_rows: list[int] = []  # the step index of each call of the chosen-kernel path

    order = ModelRunner._order

    def recording_order(self, scheduled):
        ordered, num_decode = order(self, scheduled)
        steps.append((num_decode, len(ordered)))
        return ordered, num_decode

    chosen_path = BlockedLinear._many_rows

    def recording_many_rows(self, x2, y):
        many_rows.append(len(steps) - 1)
        assert x2.shape[0] >= LARGE_M
        return chosen_path(self, x2, y)

    monkeypatch.setattr(ModelRunner, "_order", recording_order)
    monkeypatch.setattr(BlockedLinear, "_many_rows", recording_many_rows)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5)] for i in range(70)]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm = LLM(str(path), dtype="bfloat16", kv_budget="64MiB", max_num_seqs=80, threads=1)
    assert llm.engine.backends.cpu_linear == "blocked"
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    llm.engine.close()
    decode_steps = [i for i, (d, n) in enumerate(steps) if d == n and n >= LARGE_M]
    assert decode_steps, steps  # pure decode steps of 64+ rows did run layer by layer
    assert many_rows and all(steps[i][0] < steps[i][1] for i in many_rows), (steps, many_rows)

    old = large_m.force("avx512")  # the same engine with every step on the decode kernel
    try:
        ref_llm = LLM(str(path), dtype="bfloat16", kv_budget="64MiB", max_num_seqs=80, threads=1)
        want = [o.outputs[0].token_ids for o in ref_llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
        ref_llm.engine.close()
    finally:
        large_m.force(old)
    # The prefill rows ran on AMX here and on the decode kernel there, so the KV they wrote may part by the two
    # kernels' rounding (0 of 70 part in this run); decode rows never do (the mixed-step test below is exact).
    same = sum(a == b for a, b in zip(got, want))
    assert same >= len(prompts) - 2, f"{len(prompts) - same} of {len(prompts)} greedy sequences differ"


def _decode_logits(path, monkeypatch, arrival: list[int] | None) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Request "a" (5 prompt tokens, 6 greedy tokens) alone, or with a second request of `arrival` tokens added
    after a's first decode step. Returns a's logits row of every step that sampled it, and (decode rows, rows)
    of each layer-by-layer step."""
    from memfit.llm.engine import EngineConfig, LLMEngine

    rows, steps = [], []
    sample, order = ModelRunner._sample, ModelRunner._order

    def recording_sample(self, logits, sampled):
        rows.extend(logits[i].clone() for i, s in enumerate(sampled) if s.request_id == "a")
        return sample(self, logits, sampled)

    def recording_order(self, scheduled):
        ordered, num_decode = order(self, scheduled)
        steps.append((num_decode, sum(item.num_new for item in ordered)))
        return ordered, num_decode

    monkeypatch.setattr(ModelRunner, "_sample", recording_sample)
    monkeypatch.setattr(ModelRunner, "_order", recording_order)
    eng = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", kv_budget="64MiB", max_num_seqs=4))
    try:
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        eng.add_request(prompt_token_ids=[5, 9, 14, 3, 7], params=sp, request_id="a")
        for _ in range(2):  # a's prefill, then its first decode step
            eng.step()
        if arrival is not None:
            eng.add_request(prompt_token_ids=arrival, params=sp, request_id="b")
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        eng.close()
    monkeypatch.setattr(ModelRunner, "_sample", sample)
    monkeypatch.setattr(ModelRunner, "_order", order)
    return rows, steps


def test_a_decode_row_batched_with_another_prefill_keeps_its_bits(tmp_path, monkeypatch):
    """bf16 with prefill on AMX: a decode row that shares a step with another sequence's prefill (the step's many
    rows on the AMX kernel) keeps the decode kernel's bits, so its logits are those of the same sequence decoding
    alone, step for step (it differed by the two kernels' rounding before)."""
    need(torch.bfloat16)
    if large_m.amx_linear() is None:
        import pytest

        pytest.skip("no AMX here: every row of every step runs on the decode kernel already")
    # K of 512 and 1024: wide enough that the two kernels' roundings part somewhere in the logits
    path = make_tiny_model_dir(tmp_path, dtype="bfloat16", hidden_size=512, intermediate_size=1024,
                               num_attention_heads=8, num_key_value_heads=4)
    old = large_m.force("amx")
    try:
        alone, _ = _decode_logits(path, monkeypatch, None)
        mixed, steps = _decode_logits(path, monkeypatch, [(11 * j) % 250 + 3 for j in range(120)])
    finally:
        large_m.force(old)
    assert any(0 < d and n - d >= LARGE_M for d, n in steps), steps  # a decode row beside a 120-token prefill
    assert len(alone) == len(mixed) == 6
    for step, (a, b) in enumerate(zip(alone, mixed)):
        assert torch.equal(a, b), f"step {step}: a's logits differ by {(a.float() - b.float()).abs().max().item()}"
