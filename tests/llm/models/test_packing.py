"""Prepacked (oneDNN) CPU linears compute the same model as plain nn.Linear, without extra memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import LlamaForCausalLM
from memfit.llm.models.packing import PackedLinear, pack_linears_for_cpu


def tiny(tie: bool, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tie, qkv_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_packed_model_matches_unpacked(dtype, tol):
    model = tiny(tie=False, dtype=dtype)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model.dense_logits(ids).float()
        n = pack_linears_for_cpu(model)
        if n == 0:
            pytest.skip("this torch build/CPU has no oneDNN linear packing")
        got = model.dense_logits(ids).float()
    assert n == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item() / 10)


def test_tied_head_is_not_packed_so_the_embedding_is_not_duplicated():
    model = tiny(tie=True, dtype=torch.float32)
    n = pack_linears_for_cpu(model)
    if n == 0:
        pytest.skip("this torch build/CPU has no oneDNN linear packing")
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    # The packed weights replaced the originals: no float parameter is left but embeddings and norms.
    left = {name for name, _ in model.named_parameters()}
    assert all("proj" not in name for name in left)


def test_tied_head_is_packed_when_the_embedding_is_memory_mapped(tmp_path):
    from memfit.llm.models.loader import load_model
    from memfit.memory.pages import is_file_backed
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="qwen2")  # Qwen2 ties its embeddings
    model, cfg = load_model(path)
    assert cfg.tie_word_embeddings and is_file_backed(model.model.embed_tokens.weight)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model.dense_logits(ids)
        if pack_linears_for_cpu(model) == 0:
            pytest.skip("this torch build/CPU has no oneDNN linear packing")
        got = model.dense_logits(ids)
    assert isinstance(model.lm_head, PackedLinear)
    assert is_file_backed(model.model.embed_tokens.weight)  # still the checkpoint's rows, not a copy
    assert (got - ref).abs().max().item() < 1e-4
