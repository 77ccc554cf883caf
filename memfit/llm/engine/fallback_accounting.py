"""What a step and the process hold where memfit's CPU kernels don't run (a CPU without AVX-512: float32 linears on
oneDNN, `cpu_linear` "onednn"; PyTorch's element-wise ops, `accounting.attention_in_place` False), beside the
pre-arena figure's tensor per intermediate (`accounting.activation_bytes`). Each term is read from the code that
allocates it; `tests/llm/engine/test_fallback_step.py` checks the sum against every step's peak RSS.

- `torch_ops_bytes`: PyTorch's element-wise ops make temporaries memfit's kernels write in place
  (models/ops.py: TorchOps): the RMSNorm's squares and its normalised rows in float32 beside the one float32 copy
  counted already, RoPE's q * cos, q rolled and rolled x sin beside q (then k's, smaller), and SiLU(gate) beside
  SiLU(gate) x up.
- `row_padding_bytes`: models/packing.py pads a oneDNN linear's rows to a bucket (copying x) and runs more rows in
  blocks of the last bucket, each block's result made and then copied into the output.
- `shape_cache_bytes` (not a step's: the process's): the kernels oneDNN and PyTorch's ideep compile per input
  shape and keep, one per (row bucket, matrix shape).
"""
from __future__ import annotations

import dataclasses

import torch

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.shapes import linear_shapes

__all__ = ["kernel_keys", "linear_shapes", "pads_rows", "row_padding_bytes", "shape_cache_bytes", "torch_ops_bytes"]


def _mats(cfg: ModelConfig) -> list[tuple[int, int]]:
    return linear_shapes(cfg, fused=True)  # (out, in) of every packed matrix, the head last


def torch_ops_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int) -> int:
    """PyTorch ops' temporaries in a pass of `rows` rows, beside those `activation_bytes` counts (module doc)."""
    item = dtype.itemsize
    q = cfg.num_attention_heads * cfg.head_dim
    norm = 2 * rows * cfg.hidden_size * 4  # x^2 and x * rsqrt(mean), float32
    rope = 3 * rows * q * item  # q * cos, q.roll, q.roll * sin while q is live
    silu = rows * cfg.intermediate_size * item  # SiLU(gate) while the product is made
    return norm + rope + silu


def pads_rows(cpu_linear: str | None, device_type: str) -> bool:
    """Do a model's linears pad their rows to oneDNN's row buckets (models/packing.py)? Packed oneDNN linears and
    plain F.linear on a CPU do (`row_bucket_plain_linears`); memfit's kernels, upcast and CUDA do not."""
    return device_type == "cpu" and cpu_linear in ("onednn", None)


def row_padding_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, sampled_rows: int) -> int:
    """What padding a oneDNN linear's rows to its bucket adds in a pass of `rows` rows sampling `sampled_rows`: the
    padded copy of x and the padding rows of the result (or, past the last bucket, a block's result and its padded
    x), for the largest matrix of the layers, and likewise for the head's sampled rows."""
    from memfit.llm.models.packing import ROW_BUCKETS, row_bucket

    item, block = dtype.itemsize, ROW_BUCKETS[-1]
    *layers, (vocab, hidden) = _mats(cfg)
    n_max, k_max = max(n for n, _ in layers), max(k for _, k in layers)

    def pad(m: int, n: int, k: int) -> int:
        if m <= 0:
            return 0
        if m > block:
            return block * (n + k) * item  # one block's result, and the last block's padded x
        b = row_bucket(m, ROW_BUCKETS)
        return 0 if b == m else b * k * item + (b - m) * n * item

    return pad(rows, n_max, k_max) + pad(sampled_rows, vocab, hidden)


def kernel_keys(cfg: ModelConfig, fused: bool) -> set[tuple[int, int, bool]]:
    """(out, in, biased) of every linear: oneDNN keeps one kernel per shape *and* bias, so a biased and an unbiased
    matrix of one shape (Qwen2's q_proj and o_proj, both C x C) build two sets (a review measured 7.13 MB for one
    biased 896 x 896 linear's buckets, 13.92 with an unbiased one beside it)."""
    qkv = cfg.qkv_bias or cfg.attention_bias
    per_layer = linear_shapes(dataclasses.replace(cfg, num_hidden_layers=1), fused)  # one layer's, then the head
    *layer, head = per_layer
    biased = (([qkv] if fused else [qkv] * 3) + [cfg.attention_bias]
              + ([cfg.mlp_bias] if fused else [cfg.mlp_bias] * 2) + [cfg.mlp_bias])
    assert len(biased) == len(layer), (len(biased), len(layer))
    return {(n, k, b) for (n, k), b in zip(layer, biased)} | {(head[0], head[1], False)}


def shape_cache_bytes(cfg: ModelConfig, cpu_linear: str | None, max_rows: int, device_type: str = "cpu",
                      besides: ModelConfig | None = None, measure: bool = True) -> int:
    """The kernels oneDNN's and ideep's caches keep for the packed linears of a model stepping up to `max_rows` rows
    a call: one per (row bucket, matrix shape) (models/packing.py: row_shapes), each of what one kernel holds on this
    machine (engine/onednn_kernels.py: measured once and cached; ideep's computation and oneDNN's primitive, JIT
    code included: 510-700 KiB on the Intel host, ~525 KiB on an AMD Zen 4); a matrix
    shape `besides` (another model in the same process: a draft's target) already has is not counted again. The
    caches are the process's, kept after the engine closes. Plain F.linear (cpu_linear None) counts as oneDNN's, for
    its unfused matrices. 0 elsewhere (memfit's kernels, upcast, CUDA). measure False:
    the kernel's size from the cache if it was measured, else the Intel-fitted constant (no processes started)."""
    if device_type != "cpu" or cpu_linear not in ("onednn", None):
        return 0
    from memfit.llm.models.packing import row_shapes

    # plain F.linear (cpu_linear None: prepack=False) runs the unfused matrices on oneDNN in the same row buckets
    # (models/packing.row_bucket_plain_linears); its kernels measured ~0.54 MiB each in bf16 here, under the packed
    # matmul's that kernel_bytes measures
    fused = cpu_linear == "onednn"
    mats = kernel_keys(cfg, fused) - (kernel_keys(besides, fused) if besides else set())
    if not mats:
        return 0
    from memfit.llm.engine.onednn_kernels import kernel_bytes

    return len(mats) * row_shapes(max_rows) * kernel_bytes(measure)
