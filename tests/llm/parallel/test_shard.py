"""Sharding a checkpoint over ranks, and the greedy tokens of a 2-rank engine against a 1-rank one."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.loader import load_model, resolve_model_path
from memfit.llm.parallel.shard import ShardingError, check_divisible, load_shard, padded_vocab, shard_config
from tests.llm.tiny_models import build_tiny_hf_model, save_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """Llama with q/k/v/o and MLP biases, an untied head and a vocabulary of 321 (not a multiple of 2)."""
    model, tok = build_tiny_hf_model("llama", seed=5, attention_bias=True, mlp_bias=True)
    model.resize_token_embeddings(321, mean_resizing=False)  # rows past the tokenizer's: never looked up
    return save_hf_model(model, tok, tmp_path_factory.mktemp("tp") / "tiny-biased")


def test_shards_put_together_are_the_checkpoint(biased):
    """Each rank's slices, concatenated along the split dimension, give back the full tensors; row-parallel
    biases live on rank 0 only; the vocabulary is padded with zero rows."""
    full, cfg = load_model(biased, dtype="float32")
    ranks = [load_shard(biased, "float32", "cpu", r, 2)[0].state_dict() for r in range(2)]
    for name, t in full.state_dict().items():
        parts = [r[name] for r in ranks]
        leaf = name.rsplit(".", 2)[-2]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            got = torch.cat(parts)
            assert got.shape[0] == 2 * padded_vocab(321, 2) == 322
            torch.testing.assert_close(got[:321], t, rtol=0, atol=0)
            assert not got[321:].any()
        elif leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            torch.testing.assert_close(torch.cat(parts), t, rtol=0, atol=0)
        elif leaf in ("o_proj", "down_proj") and name.endswith("weight"):
            torch.testing.assert_close(torch.cat(parts, dim=1), t, rtol=0, atol=0)
        elif leaf in ("o_proj", "down_proj"):
            torch.testing.assert_close(parts[0], t, rtol=0, atol=0)
            assert not parts[1].any()
        else:  # norms
            for p in parts:
                torch.testing.assert_close(p, t, rtol=0, atol=0)


def test_each_rank_holds_half_the_weights(biased):
    full, _ = load_model(biased, dtype="float32")
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    # replicated: norms, and the row-parallel biases (zeros on rank 1)
    norms = sum(p.numel() * p.element_size() for n, p in full.named_parameters()
                if "norm" in n or n.endswith(("o_proj.bias", "down_proj.bias")))
    for r in range(2):
        shard, _ = load_shard(biased, "float32", "cpu", r, 2)
        held = sum(p.numel() * p.element_size() for p in shard.parameters())
        # half of everything but the replicated parts, plus one padding row of each vocab matrix
        assert held <= (full_bytes - norms) / 2 + norms + 2 * 64 * 4


def test_shard_config_is_one_rank():
    cfg = ModelConfig.from_dir(resolve_model_path("memfit-tiny"))
    s = shard_config(cfg, 2)
    assert (s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, s.vocab_size) == (4, 2, 384, 2048)
    assert s.hidden_size == cfg.hidden_size and s.head_dim == cfg.head_dim


@pytest.mark.parametrize("world, what", [(3, "num_attention_heads"), (8, "num_key_value_heads")])
def test_size_that_does_not_divide_the_heads_is_refused(world, what):
    with pytest.raises(ShardingError, match=f"does not divide the model's {what}"):
        check_divisible("memfit-tiny", world)


def test_engine_refuses_before_starting_any_rank():
    from memfit.llm import LLM

    with pytest.raises(ShardingError, match="--tensor-parallel-size 3 does not divide"):
        LLM(model="memfit-tiny", tensor_parallel_size=3)
