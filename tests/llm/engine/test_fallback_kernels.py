"""The ledger's `shape_cache` (engine/fallback_accounting.kernel_counts) counts the oneDNN kernels an engine's linears
build, and the engine builds them all at load: every matmul call that runs on oneDNN is recorded (its kind, matrix
shape, bias and row count: what oneDNN keys a kernel by) from before the engine loads until its requests end, in
plain, chain, tree and self-draft runs, the head's calls included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.engine.onednn_kernels import kernel_bytes
from memfit.llm.engine.params import SamplingParams
from memfit.llm.models import packing

from tests.llm.engine.spec_helpers import DRAFT

PROMPTS = [[5 + (7 * i) % 90] * n for i, n in enumerate((3, 17, 70, 100, 130, 9, 200, 45))]  # ids; 3-200 tokens

CASES = {
    # memfit's row-major kernel: its rows past 64 (prefill chunks up to 128, the verified rows of 8 trees) on oneDNN
    "memfit-tree": dict(cpu_linear="memfit", speculative_model=DRAFT, speculative_tree="3,2"),
    "plain-self-chain": dict(prepack=False, speculative_model="self:1", num_speculative_tokens=3),
    "onednn-chain": dict(cpu_linear="onednn", speculative_model=DRAFT, num_speculative_tokens=4,
                         speculative_adaptive=True),
    "plain": dict(prepack=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_is_built_at_load_and_counted(case, monkeypatch):
    from memfit.llm.engine.api import LLM

    if case.startswith("memfit"):
        from memfit.llm.kernels.linear import can_use_row_major

        if not can_use_row_major(torch.bfloat16):
            pytest.skip("memfit's row-major kernel does not run bf16 here")
    if not packing.can_pack_for_cpu(torch.bfloat16):  # its self-check's kernels (once a process) before recording
        pytest.skip("this torch build/CPU runs no bf16 oneDNN matmul")
    built: set[tuple] = set()
    linear, packed_op = F.linear, packing.PackedLinear._op

    def plain(x, w, b=None):
        built.add(("plain", w.shape[0], w.shape[1], b is not None, x.reshape(-1, x.shape[-1]).shape[0]))
        return linear(x, w, b)

    def packed(self, x):
        built.add(("packed", self.out_features, self.in_features, self.bias is not None, x.shape[0]))
        return packed_op(self, x)

    monkeypatch.setattr(F, "linear", plain)
    monkeypatch.setattr(packing.PackedLinear, "_op", packed)
    llm = LLM("memfit-tiny", dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=128, threads=1,
              enable_prefix_caching=False, **CASES[case])
    try:
        at_load = set(built)
        params = [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i)
                  for i in range(len(PROMPTS))]
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
        assert built == at_load, sorted(built - at_load)  # nothing new after load: the head's rows were enough
        reserved = llm.engine.ledger.by_owner().get("shape_cache", 0)
        assert reserved == len(at_load) * kernel_bytes(False), (reserved / kernel_bytes(False), sorted(at_load))
        assert len(at_load) > 0
    finally:
        llm.engine.close()
