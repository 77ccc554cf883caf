"""memfit's Llama-family model against transformers, on tiny random models of each family built here.

Each HF model is saved to disk with transformers' own save_pretrained and loaded back with memfit's loader,
so these tests cover config parsing, weight loading and the forward pass together.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from memfit.llm.kernels.attention import DenseCausalAttention
from memfit.llm.models.loader import load_model
from tests.llm.tiny_models import build_tiny_hf_model, save_hf_model

# variant -> (HF family, HF config overrides). Together: GQA everywhere, llama3 and linear RoPE scaling,
# q/k/v biases + tied embeddings (Qwen2), a sliding window shorter than the test sequences (Mistral), and
# Qwen2's use_sliding_window/max_window_layers, which decide per layer whether the window applies.
VARIANTS = {
    "llama3-rope": ("llama", {}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {}),
    "mistral-window8": ("mistral", {"sliding_window": 8}),
    "qwen2-window8-all-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    # max_window_layers (default 28) >= num layers: the window is on in the config but used by no layer.
    "qwen2-window8-no-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 8}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (HF model, memfit model, model dir); built once for the module."""
    out = {}
    for variant, (family, kwargs) in VARIANTS.items():
        hf, tok = build_tiny_hf_model(family, seed=0, **kwargs)
        path = save_hf_model(hf, tok, tmp_path_factory.mktemp(variant) / "model")
        model, _ = load_model(path)
        out[variant] = (hf, model, path)
    return out


def _batch(vocab: int, b: int = 3, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_fp32(models, variant):
    hf, model, _ = models[variant]
    assert model.lm_head.weight.dtype == torch.float32
    ids = _batch(model.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits  # (B, T, V)
        out = model.dense_logits(ids)
    assert out.shape == ref.shape
    assert ref.abs().max() > 0.5  # the logits are far from flat, so a wrong model cannot pass by accident
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "mistral-window8"])
def test_flattened_ragged_batch_matches_per_sequence(models, variant):
    """Several sequences of different lengths flattened into one N dimension, as the engine runs them."""
    hf, model, _ = models[variant]
    lens = [5, 17, 11]
    seqs = [_batch(model.config.vocab_size, 1, n, seed=10 + n)[0] for n in lens]
    ids = torch.cat(seqs)  # (N,)
    positions = torch.cat([torch.arange(n) for n in lens])  # (N,)
    with torch.no_grad():
        hidden = model(ids, positions, DenseCausalAttention(lens, model.scale, model.config.sliding_window))
        logits = model.compute_logits(hidden)  # (N, V)
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers_generate(models, variant):
    hf, model, _ = models[variant]
    prompt = _batch(model.config.vocab_size, 1, 6, seed=3)  # (1, 6)
    n_new = 16
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
            min_new_tokens=0, eos_token_id=None, pad_token_id=0,
        )
        seq = prompt
        for _ in range(n_new):  # memfit greedy: full recompute each step (no cache), argmax of the last row
            nxt = model.dense_logits(seq)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([seq, nxt], dim=1)
    assert ref.shape == seq.shape == (1, 6 + n_new)
    assert seq.tolist() == ref.tolist()


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.15), ("float16", 0.03)])
def test_half_precision_load_is_close(models, dtype, atol):
    hf, _, path = models["llama3-rope"]
    model, cfg = load_model(path, dtype=dtype)
    assert cfg.torch_dtype == dtype
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    ids = _batch(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model.dense_logits(ids).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    # Close, and agreeing on the top token almost everywhere.
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_bf16_checkpoint_loads_in_its_own_dtype(models, tmp_path):
    hf, _, _ = models["qwen2"]
    from tests.llm.tiny_models import train_tokenizer

    path = save_hf_model(hf, train_tokenizer(), tmp_path / "bf16", dtype="bfloat16")
    model, cfg = load_model(path)  # dtype None: the checkpoint's
    assert cfg.torch_dtype == "bfloat16"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref_model = copy.deepcopy(hf).to(torch.bfloat16)  # a copy: the shared fp32 model must stay exact
    ids = _batch(cfg.vocab_size)
    with torch.no_grad():
        out, ref = model.dense_logits(ids).float(), ref_model(ids).logits.float()
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0)


def test_sharded_checkpoint_loads_identically(models, tmp_path):
    hf, model, _ = models["llama3-rope"]
    from tests.llm.tiny_models import train_tokenizer

    path = save_hf_model(hf, train_tokenizer(), tmp_path / "sharded", sharded=True)
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = _batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(sharded.dense_logits(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_qwen2_mixed_window_layers_are_refused(tmp_path):
    from memfit.llm.models import ModelFormatError
    from tests.llm.tiny_models import make_tiny_model_dir

    # Layer 0 full attention, layer 1 windowed: memfit has one window for all layers, so it must refuse.
    path = make_tiny_model_dir(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ModelFormatError, match="sliding"):
        load_model(path)
