"""ModelConfig: the one config every Llama-family model is built from, read from a Hugging Face config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ModelFormatError(ValueError):
    """A model directory or config that memfit cannot load; the message says what is wrong."""


# Architectures that share the Llama block (pre-norm RMSNorm, RoPE, GQA attention, SwiGLU MLP). The flags
# say what differs: Qwen2 has q/k/v biases; Mistral may use a sliding window.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": False},
    "MistralForCausalLM": {"qkv_bias": False},
    "Qwen2ForCausalLM": {"qkv_bias": True},
}

# Upper bounds on a config's sizes: far above any released model (Llama 3.1 405B: 126 layers, hidden 16384,
# intermediate 53248, vocabulary 128256), low enough that a typo or a hostile config.json (1000000000000 layers)
# is refused here instead of exhausting memory in shapes.py or the RoPE tables.
MAX_SIZES = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 18, "intermediate_size": 1 << 20, "num_hidden_layers": 4096,
    "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096, "max_position_embeddings": 1 << 27,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use one of {', '.join(_DTYPES)}")
        return name
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(
        name, name
    )
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_size(name: str, value: object) -> None:
    """A size field (MAX_SIZES) is a positive integer within its bound, read from the JSON or the dataclass alike."""
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ModelFormatError(f"config field {name} must be a positive integer, got {value!r}")
    if value > MAX_SIZES[name]:  # type: ignore[operator]
        raise ModelFormatError(f"config field {name} must be at most {MAX_SIZES[name]} (the config is wrong), "
                               f"got {value!r}")


def _check_field_types(raw: dict[str, Any]) -> None:
    """Refuse a config.json field of the wrong JSON type, naming the field, what it holds and what it should; the
    sizes also get their upper bound here, before `_sliding_window` ranges over the layers. Absent and null fields
    are left to the defaults."""

    def wrong(name: str, expected: str) -> ModelFormatError:
        return ModelFormatError(f"config field {name} must be {expected}, got {raw[name]!r}")

    def given(name: str) -> bool:
        return raw.get(name) is not None

    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise wrong("architectures", 'a list of class names such as ["LlamaForCausalLM"]')
    if given("model_type") and not isinstance(raw["model_type"], str):
        raise wrong("model_type", 'a name such as "llama"')
    for name in MAX_SIZES:
        if given(name):
            _check_size(name, raw[name])
    for name in ("sliding_window", "max_window_layers"):
        if given(name) and (not _is_int(raw[name]) or raw[name] < 0):
            raise wrong(name, "a non-negative integer or null")
    if given("bos_token_id") and not _is_int(raw["bos_token_id"]):
        raise wrong("bos_token_id", "a token id (an integer) or null")
    eos = raw.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
        raise wrong("eos_token_id", "a token id (an integer), a list of them, or null")
    for name in ("rms_norm_eps", "rope_theta"):
        if given(name) and (not _is_number(raw[name]) or raw[name] < 0):
            raise wrong(name, "a non-negative number")
    if given("rope_scaling") and not isinstance(raw["rope_scaling"], dict):
        raise wrong("rope_scaling", 'an object (such as {"rope_type": "llama3", "factor": 8.0}) or null')
    for name in ("hidden_act", "torch_dtype", "dtype"):
        if given(name) and not isinstance(raw[name], str):
            raise wrong(name, "a string")
    layer_types = raw.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(k, str) for k in layer_types)):
        raise wrong("layer_types", "a list of strings")


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    """The attention window every layer uses, or None. memfit applies one window to all layers, so a
    config whose layers differ (some windowed, some full) is refused rather than run wrongly.

    Mistral: `sliding_window` applies to every layer. Qwen2: only when `use_sliding_window`, and then only
    to layers >= `max_window_layers` (transformers >= 5 spells this out as `layer_types`).
    """
    window = raw.get("sliding_window")
    if window is None or not raw.get("use_sliding_window", True):
        return None
    kinds = raw.get("layer_types")
    if kinds is None and arch == "Qwen2ForCausalLM":
        first = raw.get("max_window_layers", 28)  # transformers' Qwen2 default
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(raw["num_hidden_layers"])]
    if not kinds or set(kinds) == {"sliding_attention"}:
        return window
    if set(kinds) == {"full_attention"}:
        return None
    raise ModelFormatError(
        f"this config mixes sliding-window and full-attention layers ({sorted(set(kinds))}); memfit supports "
        "one attention window for all layers"
    )


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    attention_bias: bool = False  # Llama's `attention_bias`: biases on q/k/v/o
    mlp_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in MAX_SIZES:
            _check_size(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ModelFormatError(f"config field rope_scaling must be an object or null, "
                                       f"got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ModelFormatError(
                    f"rope_scaling type {kind!r} is not supported yet (supported: default, linear, llama3)"
                )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers, in the model dtype: 2 x layers x kv_heads x head_dim x itemsize."""
        itemsize = torch.empty((), dtype=parse_dtype(self.torch_dtype)).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def num_parameters(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias or self.attention_bias:
            attn += q + 2 * kv + (h if self.attention_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        return v * h + L * per_layer + h + (0 if self.tie_word_embeddings else v * h)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        _check_field_types(raw)  # a wrong JSON type is named here, not met as a TypeError deep in the build
        archs = raw.get("architectures") or []
        if not archs:
            model_type = raw.get("model_type", "")
            archs = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(
                model_type, [model_type or "<missing>"]
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"architecture {arch!r} is not supported; memfit runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ModelFormatError(f"config.json lacks required field(s): {', '.join(missing)}")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta")
        # transformers >= 5 may nest RoPE settings under `rope_parameters`.
        rope_params = raw.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default" and rope_scaling is None:
                rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelFormatError(f"hidden_act {act!r} is not supported; memfit's MLP is SwiGLU (silu)")
        try:
            return cls(
                architecture=arch,
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or (raw["hidden_size"] // heads),
                max_position_embeddings=raw.get("max_position_embeddings", 2048),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta or 10000.0),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=SUPPORTED_ARCHITECTURES[arch]["qkv_bias"],
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=_sliding_window(raw, arch),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos_list,
            )
        except TypeError as exc:
            raise ModelFormatError(f"malformed config.json: {exc}") from exc

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelFormatError(f"{cfg_path} not found: a model directory needs a Hugging Face config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"{cfg_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{cfg_path} must hold a JSON object")
        return cls.from_hf_dict(raw)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, (head_dim/2,), with `linear` or `llama3` scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float()
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_ctx / low_freq_factor
    high_freq_wavelen = old_ctx / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled).float()
