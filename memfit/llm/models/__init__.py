"""Llama-family models (Llama 2/3, Qwen2/2.5, Mistral): one config-driven implementation."""
from __future__ import annotations

from memfit.llm.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    ModelFormatError,
    parse_dtype,
)
from memfit.llm.models.llama import LlamaForCausalLM

# architecture name in config.json -> the class that runs it. All share the Llama block; the config's
# flags (qkv_bias, tie_word_embeddings, sliding_window, rope_scaling) carry the differences.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def build_model(cfg: ModelConfig) -> LlamaForCausalLM:
    """Construct the model for `cfg` on the current default device (use `with torch.device("meta")` to
    build it without storage, as the loader does)."""
    try:
        cls = MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise ModelFormatError(
            f"architecture {cfg.architecture!r} is not supported; memfit runs {', '.join(sorted(MODEL_CLASSES))}"
        ) from None
    return cls(cfg)


__all__ = [
    "MODEL_CLASSES",
    "SUPPORTED_ARCHITECTURES",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelFormatError",
    "build_model",
    "parse_dtype",
]
