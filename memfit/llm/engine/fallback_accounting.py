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

__all__ = ["engine_kernels_bytes", "head_rows", "kernel_counts", "kernel_keys", "linear_shapes", "pads_rows", "row_padding_bytes", "shape_cache_bytes", "torch_ops_bytes"]


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


def head_rows(batch: int, gamma: int = 0, tree: tuple[int, int] | None = None, draft: bool = False) -> int:
    """The most rows one call of a model's head takes in an engine of `batch` sequences: a sampled row a sequence
    (engine/runner.py); the target verifying a chain of `gamma` drafts, g + 1 a sequence (spec_chain_step.py), or a
    W,D tree, its W x D + 1 nodes (spec_tree_step.py; with speculative_adaptive it may verify a chain of D instead,
    fewer); a draft (`draft`): one row a sequence drafting a chain or its first tree pass, a tree level's W after."""
    if draft:
        return batch * (tree[0] if tree else 1)
    if tree:
        return batch * (tree[0] * tree[1] + 1)
    return batch * (gamma + 1)


Kernel = tuple[str, int, int, bool]  # (kind, out, in, biased): "packed" oneDNN matmul or "plain" F.linear


def kernel_counts(cfg: ModelConfig, cpu_linear: str | None, max_rows: int, head_rows: int | None = None,
                  mapped: bool = True, fused: bool = True) -> dict[Kernel, int]:
    """{(kind, out, in, biased): kernels oneDNN keeps for that matrix} for a CPU model stepping up to `max_rows` rows a
    call whose head takes up to `head_rows` (`head_rows`; default `max_rows`), as `packing.warm_row_buckets` builds them
    at load: packed oneDNN linears (fused where the engine fuses, `fused`; a tied head whose embedding is not mapped
    from the checkpoint, `mapped` False, stays plain F.linear) and plain F.linear (unfused) in every bucket up to their
    rows; memfit's row-major kernel (cpu_linear "memfit": every unfused matrix; "blocked": a tied head not mapped)
    in the buckets past its own 64 rows, on plain F.linear. A packed and a plain matmul of one shape are two kernels."""
    from memfit.llm.kernels.linear import DEFAULT_MAX_ROWS
    from memfit.llm.models.packing import onednn_buckets

    head = (cfg.vocab_size, cfg.hidden_size, False)
    plain_head = cfg.tie_word_embeddings and not mapped
    if cpu_linear == "onednn":
        keys, direct = kernel_keys(cfg, fused), 0
        kind = {key: "plain" if key == head and plain_head else "packed" for key in keys}
    elif cpu_linear is None or cpu_linear == "memfit":
        keys, direct = kernel_keys(cfg, False), (0 if cpu_linear is None else DEFAULT_MAX_ROWS)
        kind = dict.fromkeys(keys, "plain")
    elif cpu_linear == "blocked" and plain_head:
        keys, direct, kind = {head}, DEFAULT_MAX_ROWS, {head: "plain"}
    else:
        return {}
    head_rows = max_rows if head_rows is None else head_rows
    counts = {(kind[key], *key): len(onednn_buckets(head_rows if key == head else max_rows, direct)) for key in keys}
    return {key: n for key, n in counts.items() if n}


def shape_cache_bytes(cfg: ModelConfig, cpu_linear: str | None, max_rows: int, device_type: str = "cpu",
                      besides: dict[Kernel, int] | None = None, measure: bool = True,
                      head_rows: int | None = None, mapped: bool = True, fused: bool = True) -> int:
    """The kernels oneDNN's and ideep's caches keep for a model's linears (`kernel_counts`: one per row bucket and
    matrix shape, the head's buckets up to `head_rows`), each of what one kernel holds on this machine
    (engine/onednn_kernels.py: measured once and cached; ideep's computation and oneDNN's primitive, JIT code
    included: 510-700 KiB on the Intel host, ~525 KiB on an AMD Zen 4). `besides`: the kernel_counts of another model
    in the same process (a draft's target), whose kernels are not counted again. The caches are the process's, kept
    after the engine closes. 0 for upcast, a blocked model with its head packed, and CUDA. measure False: the
    kernel's size from the cache if it was measured, else the Intel-fitted constant (no processes started)."""
    if device_type != "cpu":
        return 0
    have = besides or {}
    count = sum(max(0, n - have.get(key, 0)) for key, n in kernel_counts(cfg, cpu_linear, max_rows, head_rows,
                                                                         mapped, fused).items())
    if not count:
        return 0
    from memfit.llm.engine.onednn_kernels import kernel_bytes

    return count * kernel_bytes(measure)


def engine_kernels_bytes(cfg: ModelConfig, cpu_linear: str | None, max_rows: int, device_type: str, batch: int,
                         mapped: bool = True, draft: ModelConfig | None = None, gamma: int = 0,
                         tree: tuple[int, int] | None = None, draft_mapped: bool = True, measure: bool = True) -> int:
    """`shape_cache_bytes` for an engine of `batch` sequences: its model's, with the head's rows its sampled or
    verified rows (`head_rows`), and with a `draft` (speculating `gamma` tokens or a `tree`) the kernels the draft's
    own shapes and rows add."""
    rows = head_rows(batch, gamma, tree) if draft is not None else batch
    total = shape_cache_bytes(cfg, cpu_linear, max_rows, device_type, measure=measure, head_rows=rows, mapped=mapped)
    if draft is not None:
        have = kernel_counts(cfg, cpu_linear, max_rows, rows, mapped)
        total += shape_cache_bytes(draft, cpu_linear, max_rows, device_type, have, measure,
                                   head_rows(batch, tree=tree, draft=True), draft_mapped)
    return total
