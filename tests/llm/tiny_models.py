"""Tiny random-initialised Hugging Face model directories, built at test time (no network, no downloads).

`make_tiny_model_dir(tmp_path, family=...)` writes what a real Hub snapshot holds: config.json,
*.safetensors (optionally sharded with model.safetensors.index.json), tokenizer.json,
tokenizer_config.json (with a ChatML chat template) and generation_config.json. The model is built and
saved by `transformers` itself, so memfit is compared against the reference implementation's own files.

transformers is a test-only dependency: import this module only from tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "mistral")

# ChatML, as Qwen2 ships it (shortened: no tool calls). `bos_token` is unused on purpose: ChatML has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A few sentences with some non-ASCII text, so byte-level merges and multi-byte characters both occur.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "memfit runs models inside a memory budget.",
    "Hello world! Hello memory! Hello tokens!",
    "A paged cache and a virtual cache hold the same keys and values.",
    "Grüße aus München, café crème, naïve façade.",
    "日本語のテキストと絵文字 🙂🚀 も少し。",
    "def add(a, b):\n    return a + b\n",
]


def train_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE (GPT-2 / Qwen style) trained in milliseconds on CORPUS; specials get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


# Llama 3.1-style scaled RoPE; original context kept small so all three wavelength bands occur.
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_config(family: str, vocab_size: int, eos_id: int, **overrides: Any) -> Any:
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA: 2 query heads per KV head
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        # Wider than the usual 0.02 so the logits are far from flat and greedy choices are not near-ties.
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    }
    family_defaults: dict[str, tuple[Any, dict[str, Any]]] = {
        "llama": (transformers.LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
        # Qwen2/2.5 small models: q/k/v biases (implied by the architecture) and tied embeddings.
        "qwen2": (transformers.Qwen2Config, {"rope_theta": 1000000.0, "tie_word_embeddings": True}),
        "mistral": (transformers.MistralConfig, {"rope_theta": 10000.0, "sliding_window": None}),
    }
    if family not in family_defaults:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    cls, defaults = family_defaults[family]
    return cls(**{**common, **defaults, **overrides})


def build_tiny_hf_model(family: str = "llama", seed: int = 0, **config_overrides: Any) -> tuple[Any, Any]:
    """(transformers model in float32, eval mode; trained tokenizers.Tokenizer). Biases and norm weights are
    randomised too, so a loader that skipped them would be caught by the parity tests.

    config_overrides go to the HF config class, e.g. sliding_window=8 (Mistral), rope_scaling={...} (Llama;
    default: `llama3` scaling), use_sliding_window/max_window_layers (Qwen2).
    """
    import transformers

    tok = train_tokenizer()
    eos_id = tok.token_to_id("<|im_end|>")
    cfg = _hf_config(family, tok.get_vocab_size(), eos_id, **config_overrides)
    torch.manual_seed(seed)
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[family]
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tok


def write_tokenizer_files(path: Path, tok: Any, generation: dict[str, Any] | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (ChatML template) and generation_config.json."""
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 256,
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "max_new_tokens": 64,
    }
    gen.update(generation or {})
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


def save_hf_model(model: Any, tok: Any, path: Path, dtype: str = "float32", sharded: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype == "float32" else _cast_copy(model, dtype)
    # max_shard_size small enough that even the tiny model spans several shard files + an index.
    to_save.save_pretrained(path, safe_serialization=True, max_shard_size="50KB" if sharded else "5GB")
    write_tokenizer_files(path, tok)
    return path


def _cast_copy(model: Any, dtype: str) -> Any:
    import copy

    return copy.deepcopy(model).to(getattr(torch, dtype))


def make_tiny_model_dir(
    tmp_path: Path | str,
    family: str = "llama",
    dtype: str = "float32",
    sharded: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a random tiny `family` model and save it as a complete HF model directory; returns the dir.

    hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), vocab = the byte-level tokenizer's size (~320),
    max_position_embeddings 256. dtype: float32 | bfloat16 | float16 (the saved weights and config dtype).
    config_overrides: see `build_tiny_hf_model` (e.g. sliding_window=8 for Mistral).
    """
    model, tok = build_tiny_hf_model(family, seed=seed, **config_overrides)
    name = f"tiny-{family}-{dtype}{'-sharded' if sharded else ''}-s{seed}"
    return save_hf_model(model, tok, Path(tmp_path) / name, dtype=dtype, sharded=sharded)
