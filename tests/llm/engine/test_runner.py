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
    same = sum(a == b for a, b in zip(got, want))
    assert same >= len(prompts) - 2, f"{len(prompts) - same} of {len(prompts)} greedy sequences differ"
