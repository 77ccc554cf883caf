"""`memfit fit`: predict the memory a model needs for a context length and batch, before loading it.

The prediction has four parts, each a readable formula:
- weights: parameters x itemsize (tied embeddings counted once);
- KV cache: batch x context x (2 x layers x kv_heads x head_dim x itemsize), rounded up to the cache's
  commit granularity (a 4 KiB page per layer for K and V per sequence with the virtual cache);
- activations: the peak of one engine step, dominated by a prefill chunk of `chunk` tokens: the residual
  stream and norms (several (chunk, hidden) tensors), q/k/v/o (chunk x heads x head_dim), the MLP's
  gate/up/act intermediates (3 x chunk x intermediate), the attention scores of the chunk against its
  context (heads x chunk x context, float32), and the float32 logits of the sampled rows;
- workspace: RoPE tables (max_pos x head_dim, cos and sin) and, in bf16/fp16, the runner's decode-attention
  workspace: one layer's K and V of the decode batch copied head-major (2 x batch x context x kv_heads x
  head_dim x itemsize; `attention.Workspace`, kept between steps).
The runtime itself (Python, torch's libraries) is not part of the prediction: `fit` measures and reports
it separately because it does not depend on the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memfit.llm.models.config import ModelConfig
from memfit.memory.budget import format_bytes

PAGE = 4096


@dataclass
class FitBreakdown:
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    workspace_bytes: int
    kv_budget_bytes: int | None = None
    memory_limit_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def kv_fits(self) -> bool:
        return self.kv_budget_bytes is None or self.kv_bytes <= self.kv_budget_bytes

    @property
    def fits(self) -> bool:
        return self.kv_fits and (self.memory_limit_bytes is None or self.total_bytes <= self.memory_limit_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, kv_fits=self.kv_fits)
        return d


def kv_cache_bytes(cfg: ModelConfig, dtype: torch.dtype, context_len: int, batch: int) -> int:
    """Committed KV bytes for `batch` sequences of `context_len` tokens in the virtual cache: each
    (layer, K|V) segment of a sequence is committed in whole pages."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    row = cfg.num_key_value_heads * cfg.head_dim * itemsize  # one token of K (or V) in one layer
    per_segment = -(-context_len * row // PAGE) * PAGE
    return batch * 2 * cfg.num_hidden_layers * per_segment


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk: int, context_len: int, sampled_rows: int) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    h, i = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    residual = 4 * chunk * h * itemsize + chunk * h * 4  # x, normed x, attn out, mlp out; float32 norm
    attn = chunk * (2 * q + 2 * kv) * itemsize  # q, k, v, attention output
    scores = cfg.num_attention_heads * chunk * context_len * 4  # float32 scores of the chunk
    mlp = 3 * chunk * i * itemsize  # gate, up, silu(gate) * up
    logits = sampled_rows * cfg.vocab_size * 4 * 2  # float32 logits and their softmax
    return residual + attn + scores + mlp + logits


def predict(
    cfg: ModelConfig,
    dtype: torch.dtype,
    context_len: int,
    batch: int,
    chunk: int = 512,
    kv_budget: int | None = None,
    memory_limit: int | None = None,
) -> FitBreakdown:
    if context_len < 1 or batch < 1 or chunk < 1:
        raise ValueError("context length, batch and chunk must be at least 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = cfg.num_parameters() * itemsize
    return FitBreakdown(
        weights_bytes=weights,
        kv_bytes=kv_cache_bytes(cfg, dtype, context_len, batch),
        activation_bytes=activation_bytes(cfg, dtype, min(chunk, context_len), context_len, batch),
        workspace_bytes=2 * cfg.max_position_embeddings * cfg.head_dim * itemsize
        + (0 if dtype == torch.float32 else 2 * batch * context_len * cfg.num_key_value_heads * cfg.head_dim * itemsize),
        kv_budget_bytes=kv_budget,
        memory_limit_bytes=memory_limit,
    )


def fit_report(cfg: ModelConfig, dtype: torch.dtype, context_len: int, batch: int, kv_budget: int | None = None,
               memory_limit: int | None = None, chunk: int = 512) -> str:
    b = predict(cfg, dtype, context_len, batch, chunk, kv_budget, memory_limit)
    lines = [
        f"memory needed for batch {batch} x {context_len} tokens ({str(dtype).replace('torch.', '')}):",
        f"  weights      {format_bytes(b.weights_bytes):>12}",
        f"  KV cache     {format_bytes(b.kv_bytes):>12}" + (
            f"   (budget {format_bytes(kv_budget)}: {'fits' if b.kv_fits else 'does NOT fit'})" if kv_budget else ""),
        f"  activations  {format_bytes(b.activation_bytes):>12}",
        f"  workspace    {format_bytes(b.workspace_bytes):>12}",
        f"  total        {format_bytes(b.total_bytes):>12}" + (
            f"   (limit {format_bytes(memory_limit)}: {'fits' if b.fits else 'does NOT fit'})" if memory_limit else ""),
    ]
    return "\n".join(lines)
