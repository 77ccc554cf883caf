"""Prepacked CPU linear layers: decode on a CPU is a stream of skinny matmuls (a few rows times a large
weight), and oneDNN runs them markedly faster from weights reordered once into its blocked layout than
from PyTorch's row-major ones (measured here: about 1.7x for a 0.1B bf16 model at batch 1 and 8; see
benchmarks/decode_throughput.py). This is what PyTorch's own compiler does for frozen CPU graphs; we
do it eagerly, on the model, once after loading.

The packed weight *replaces* the original, and the original's pages of the memory-mapped checkpoint are
given back to the kernel (`memfit.memory.pages.drop_file_pages`), so packing costs no extra resident
memory once done; while packing, at most one layer's weight is held twice.

A tied `lm_head` shares its matrix with the token embedding, which the lookup still needs in row-major
form. When that matrix is memory-mapped from the checkpoint we pack the head anyway and give back the
embedding's resident pages: a lookup reads only the rows of the step's tokens, which page back in from the
file on demand, so the resident embedding shrinks to the rows in use instead of being held twice. (The
head is a large part of a small model's decode: Qwen2.5-0.5B's is 136M of its 494M parameters.) When the
embedding is ordinary memory (e.g. converted to another dtype at load), the head is left unpacked.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _ops_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# oneDNN, and PyTorch's ideep above it, compile a kernel per input shape and keep it for the rest of the process (up to
# 1024 each): about 560 KiB per shape on this build, whatever the matrix (benchmarks/onednn_shape_cache.py). Called at
# every exact row count (each decode batch, prompt tail and verification size) the heap grew 141 MiB over row counts
# 1..64 of memfit-tiny. So x's rows are padded to one of ROW_BUCKETS (padding rows changes no real row's bits: a row of
# oneDNN's fp32 matmul does not depend on the others, checked in tests/llm/models/test_packing.py), and a call with
# more rows runs in blocks of the last bucket (a tied head left unpacked too: RowBucketedLinear): one matrix then has at
# most len(ROW_BUCKETS) kernels, built at load (warm_row_buckets) and counted in
# the engine's ledger (engine/fallback_accounting.shape_cache_bytes). Chosen by measurement (docs/engine.md).
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def row_bucket(m: int, buckets: tuple[int, ...] = ROW_BUCKETS) -> int:
    """The rows a oneDNN call of `m` rows (at most the last bucket) computes: the smallest bucket >= m."""
    for b in buckets:
        if b >= m:
            return b
    raise ValueError(f"{m} rows is more than the largest row bucket {buckets[-1]}")


def row_shapes(max_rows: int, buckets: tuple[int, ...] = ROW_BUCKETS) -> int:
    """How many row counts (so kernels in oneDNN's caches) one packed matrix can be called with, for calls of up to
    `max_rows` rows."""
    return sum(1 for b in buckets if b <= row_bucket(min(max(1, max_rows), buckets[-1]), buckets))


def _bucket_rows(x: torch.Tensor, out_features: int, op) -> torch.Tensor:
    """op(x) for x (m, in), m <= the last bucket -> (m, out), computed on its bucket's rows (the tail zeros)."""
    m, b = x.shape[0], row_bucket(x.shape[0], ROW_BUCKETS)  # the module's (a benchmark may set it)
    if b != m:
        padded = x.new_zeros(b, x.shape[1])  # (b, in)
        padded[:m] = x
        x = padded
    y = op(x)
    return y if b == m else y[:m]  # a view of the (b, out) result: the padding rows go with it


def in_row_buckets(x: torch.Tensor, out_features: int, op) -> torch.Tensor:
    """A linear `op` on x (..., in) -> (..., out) in row buckets: padded to one, or in blocks of the last."""
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    m, block = x.shape[0], ROW_BUCKETS[-1]
    if m <= block:
        return _bucket_rows(x, out_features, op).reshape(*lead, out_features)
    y = x.new_empty(m, out_features)  # (m, out); one block's (block, out) result is live beside it
    for s in range(0, m, block):
        y[s:s + block] = _bucket_rows(x[s:s + block], out_features, op)
    return y.reshape(*lead, out_features)


class RowBucketedLinear(nn.Linear):
    """An nn.Linear left unpacked (a tied head whose embedding is not mapped from the checkpoint, or every linear of
    the plain F.linear path: row_bucket_plain_linears), computed in row buckets as PackedLinear is: PyTorch's float32 F.linear runs on oneDNN here too, and kept a kernel per
    row count (about 165 KiB each for memfit-tiny's head: 10 MiB over row counts 2..64). Unlike oneDNN's packed
    matmul, its kernel for a row count may round differently from another's (3 rows and 3 padded to 4 differ in the
    last bits): as between exact row counts before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_buckets(x, self.out_features, lambda t: F.linear(t, self.weight, self.bias))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout. x: (..., in) -> (..., out), computed in row buckets."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())  # opaque mkldnn tensor
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.dtype = w.dtype
        self.nbytes = w.numel() * w.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_buckets(x, self.out_features, self._op)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed=oneDNN"


def row_bucket_plain_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of a CPU model a RowBucketedLinear (the same module, its class swapped: nothing is
    copied), for the engine's plain F.linear path (`prepack=False`, or a dtype no backend takes). F.linear runs on
    oneDNN there too and kept a kernel per exact row count: over row counts 1-300 of memfit-tiny's five bf16
    matrices the heap in use grew 550 MiB (RSS 847 MiB) on an AMX Xeon; float32 38 MiB. Returns how many."""
    count = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = RowBucketedLinear
            count += 1
    return count


def onednn_buckets(rows: int, direct_rows: int = 0) -> tuple[int, ...]:
    """The row buckets oneDNN builds a kernel for when a linear in row buckets (`in_row_buckets`) is called with up to
    `rows` rows, where calls of up to `direct_rows` rows run elsewhere (memfit's row-major kernel,
    kernels/linear.RowMajorLinear; 0: none do). Past the last bucket every bucket: a block's tail may be any size."""
    if rows <= direct_rows:
        return ()
    if rows > ROW_BUCKETS[-1]:
        return ROW_BUCKETS
    return ROW_BUCKETS[row_shapes(direct_rows) if direct_rows else 0 : row_shapes(rows)]


def warm_row_buckets(model: nn.Module, max_rows: int, head_rows: int | None = None) -> int:
    """Build oneDNN's kernel for every row bucket (up to `max_rows` rows; the model's `lm_head` up to `head_rows`, the
    most rows one call of the head takes: the sampled or verified rows of a step) of every matrix shape in `model`
    that runs on oneDNN in row buckets (packed, plain F.linear, and memfit's row-major kernel past its own rows) now,
    by one call each on zeros, so that the caches hold all they will (`onednn_buckets`, as the ledger counts them:
    engine/fallback_accounting.py) from the start. Returns the number of calls (matrices that share a shape and a
    row limit share their kernels: one call serves them all)."""
    head = getattr(model, "lm_head", None)
    seen, calls = set(), 0
    with torch.inference_mode():
        for m in model.modules():
            # memfit's row-major kernel (kernels/linear.py, which imports this module) says how many rows it takes
            direct = getattr(m, "direct_rows", 0)
            if not (isinstance(m, (PackedLinear, RowBucketedLinear)) or direct):
                continue
            dtype = m.dtype if isinstance(m, PackedLinear) else m.weight.dtype
            rows = max_rows if head_rows is None or m is not head else head_rows
            key = (type(m), m.out_features, m.in_features, dtype, m.bias is None, rows)
            if key in seen:
                continue
            seen.add(key)
            # the row-major kernel's rows past its own go to F.linear (its small buckets too, as a block's tail)
            op = (lambda t, m=m: F.linear(t, m.weight, m.bias)) if direct else m
            for b in onednn_buckets(rows, direct):
                op(torch.zeros(b, m.in_features, dtype=dtype))  # (b, in) -> (b, out), dropped
                calls += 1
    return calls


@functools.lru_cache(maxsize=None)  # once a process: its two kernels are the runtime calibration's to count
def _self_check(dtype: torch.dtype) -> bool:
    """Packing is a private PyTorch API; make sure it computes the right thing on this build/CPU."""
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48, bias=True).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=g))
            lin.bias.copy_(torch.randn(48, generator=g))
        x = torch.randn(5, 64, generator=g).to(dtype)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        got = PackedLinear(lin)(x).float()
        tol = 1e-3 if dtype == torch.float32 else 0.1 * ref.abs().max().item() / 8
        return bool((got - ref).abs().max().item() <= tol)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        log.info("oneDNN linear packing unavailable: %s", exc)
        return False


def can_pack_for_cpu(dtype: torch.dtype) -> bool:
    """Would `pack_linears_for_cpu` pack a CPU model of `dtype` on this build?"""
    return dtype in (torch.float32, torch.bfloat16) and _ops_available() and _self_check(dtype)


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Replace the model's nn.Linear layers by PackedLinear (CPU, float32/bfloat16). Returns how many
    were packed; 0 when the platform can't (the model is then left untouched)."""
    first = next(model.parameters(), None)  # not a list of them all: it would keep every replaced weight alive
    if first is None or first.device.type != "cpu" or not can_pack_for_cpu(first.dtype):
        return 0
    del first
    from memfit.memory.pages import drop_file_pages, file_mappings, is_file_backed

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    maps = file_mappings()
    # (parent, name) pairs only: a list of the modules themselves would keep every replaced weight alive
    todo = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]
    count = 0
    for parent, name in todo:
        child = getattr(parent, name)
        if tied and name == "lm_head" and parent is model and not is_file_backed(child.weight.detach(), maps):
            if type(child) is nn.Linear:  # packing would hold the embedding matrix twice: row buckets only
                child.__class__ = RowBucketedLinear
            continue
        setattr(parent, name, PackedLinear(child))
        drop_file_pages(child.weight.detach(), maps)
        del child  # the parent no longer holds it: its weight (e.g. a fused copy) goes now
        count += 1
    return count
