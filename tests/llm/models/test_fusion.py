"""Fused q/k/v and gate/up projections compute the same model, with and without packing on top."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.models.fusion import fuse_projections
from memfit.llm.models.packing import PackedLinear, pack_linears_for_cpu
from tests.llm.models.test_packing import tiny


def test_fused_model_matches_unfused_and_keeps_biases():
    model = tiny(tie=False, dtype=torch.float32)  # qkv_bias=True: the fused bias must be concatenated too
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model.dense_logits(ids)
        assert fuse_projections(model) == 2
        got = model.dense_logits(ids)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    assert attn.qkv_proj.weight.shape == (64 + 2 * 32, 64) and attn.qkv_proj.bias.shape == (128,)
    assert mlp.gate_up_proj.weight.shape == (2 * 96, 64)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert fuse_projections(model) == 0  # idempotent


def test_fused_then_packed_matches_and_packs_fewer_linears():
    model = tiny(tie=False, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model.dense_logits(ids)
        fuse_projections(model)
        n = pack_linears_for_cpu(model)
        if n == 0:
            pytest.skip("this torch build/CPU has no oneDNN linear packing")
        got = model.dense_logits(ids)
    assert n == 2 * 4 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, PackedLinear)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_engine_fuses_only_where_it_packs_or_on_gpu(tmp_path):
    from memfit.llm.engine.llm_engine import LLMEngine
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama")
    packed = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB")
    plain = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", prepack=False)
    assert plain.backends.num_fused_layers == 0 and plain.backends.num_packed_linears == 0  # the zero-copy mapping stays
    if packed.backends.num_packed_linears:
        assert packed.backends.num_fused_layers == packed.model_config.num_hidden_layers
    ids = list(range(3, 20))
    from memfit.llm.engine.params import SamplingParams

    outs = []
    for eng in (packed, plain):
        eng.add_request(prompt_token_ids=ids, params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        toks = []
        while eng.has_unfinished_requests():
            toks += [o.token_ids for o in eng.step()]
        outs.append(toks[-1])
    assert outs[0] == outs[1]
