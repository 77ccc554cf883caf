"""Which compute backends a built model runs on: projection fusion, packed or row-major CPU linears, memfit's
C++ decode kernels, and the whole-step CPU decode stack. The engine builds its parts and asks this module
once; nothing else in the engine knows which kernels exist.

    backends = prepare_model(model, BackendOptions(...), device)   # before the KV cache is built
    runner.stack = backends.decode_stack(model, kv)                  # after: needs the cache's layout

CPU linears (`cpu_linear`):
- "blocked": memfit's kernel on weights packed once into a blocked layout (the fastest at 1-32 rows,
  benchmarks/blocked_linear.py);
- "memfit": memfit's row-major kernel on the checkpoint's own mapped weights (no copy);
- "onednn": PyTorch's oneDNN on prepacked weights;
- "upcast": bf16 on a CPU without a native bf16 multiply (AVX2-only x86), weights kept bf16 and computed in
  float32: memfit's AVX2 kernel for decode rows, MKL's float32 GEMM on blocks of widened weights for prefill
  (kernels/upcast.py);
- "auto": "blocked" where it runs, else "memfit" for engines that decode at most AUTO_MEMFIT_MAX_SEQS
  sequences at once, else "onednn".
A memfit kernel that can't be built or run here falls back to oneDNN (the reason is logged), a bf16 model that
oneDNN can't pack either (it needs avx512bw/vl/dq or avx_ne_convert) to "upcast" where that applies, and a GPU or
`prepack=False` uses plain F.linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Without memfit's blocked kernel, "auto" picks the row-major one when no decode step can batch more rows than
# this: it beats packed oneDNN by ~1.6x at batch 1 but loses ~25% at batch 8 (benchmarks/decode_throughput.py).
AUTO_MEMFIT_MAX_SEQS = 2


@dataclass(frozen=True)
class BackendOptions:
    """The engine options that choose backends (EngineConfig's fields of the same names, validated there)."""

    max_num_seqs: int = 64
    prepack: bool = True  # CPU: a decode-speed linear backend; False = plain F.linear
    fuse: bool = True  # one matmul for q/k/v and one for gate/up (GPU, or before packing on the CPU)
    cpu_linear: str = "auto"
    cpu_kernels: bool = True  # CPU: memfit's C++ kernels for norm, RoPE, SiLU*up and decode attention
    max_rows: int = 0  # the most rows a step computes (max_num_batched_tokens; 0: any): oneDNN kernels built at load
    head_rows: int = 0  # the most rows one call of the lm_head takes (sampled or verified rows; 0: max_rows)


@dataclass
class ComputeBackends:
    """What `prepare_model` chose and did to the model."""

    cpu_linear: str | None  # "blocked" | "memfit" | "onednn" | "upcast" | None (plain F.linear)
    cpu_kernels: bool  # memfit's C++ op kernels are installed (model.set_ops)
    num_fused_layers: int = 0
    num_blocked_linears: int = 0
    num_row_major_linears: int = 0
    num_packed_linears: int = 0
    num_upcast_linears: int = 0
    num_bucketed_linears: int = 0  # plain F.linear in row buckets (cpu_linear None on a CPU)

    def decode_stack(self, model: nn.Module, kv: object):
        """memfit's whole-step CPU decode stack (kernels/stack.py) where it runs with this model and cache,
        else None (the runner then goes layer by layer)."""
        if not (self.cpu_kernels and self.cpu_linear in ("blocked", "memfit")):
            return None
        from memfit.llm.kernels.stack import CpuDecodeStack

        return CpuDecodeStack(model, kv) if CpuDecodeStack.unsupported(model, kv) is None else None


def choose_cpu_linear(options: BackendOptions, device: torch.device, dtype: torch.dtype) -> str | None:
    """The CPU linear backend for a model of `dtype` on `device` (see the module docstring)."""
    if device.type != "cpu" or not options.prepack:
        return None
    if options.cpu_linear in ("auto", "blocked"):
        from memfit.llm.kernels.blocked import can_use_blocked

        if can_use_blocked(dtype):
            return "blocked"
    want_memfit = options.cpu_linear == "memfit" or (
        options.cpu_linear == "auto" and options.max_num_seqs <= AUTO_MEMFIT_MAX_SEQS
    )
    if want_memfit:
        from memfit.llm.kernels.linear import can_use_row_major

        if can_use_row_major(dtype):
            return "memfit"
    from memfit.llm.kernels.upcast import available as upcast_available
    from memfit.llm.models.packing import can_pack_for_cpu

    if options.cpu_linear == "upcast" and upcast_available(dtype):
        return "upcast"
    if can_pack_for_cpu(dtype):
        return "onednn"
    return "upcast" if upcast_available(dtype) else None


def prepare_model(model: nn.Module, options: BackendOptions, device: torch.device) -> ComputeBackends:
    """Fuse, pack and install kernels on a loaded model, in place; returns what was chosen."""
    dtype = next(model.parameters()).dtype
    chosen = ComputeBackends(cpu_linear=choose_cpu_linear(options, device, dtype), cpu_kernels=False)
    # Fusion copies q/k/v and gate/up into new memory. It pays on a GPU and before packing (oneDNN's or
    # memfit's blocked layout, which copy anyway: fewer, wider matmuls); with memfit's row-major kernel
    # it measured no faster (0.97-1.02x, docs/engine.md), so the weights keep their zero-copy mapping.
    if options.fuse and (chosen.cpu_linear in ("onednn", "blocked") or device.type == "cuda"):
        from memfit.llm.models.fusion import fuse_projections

        chosen.num_fused_layers = fuse_projections(model)
    if chosen.cpu_linear == "blocked":
        from memfit.llm.kernels.blocked_model import use_blocked_linears

        chosen.num_blocked_linears = use_blocked_linears(model)
        mlp_row_blocks(model)
    if chosen.cpu_linear in ("blocked", "memfit"):  # "blocked" leaves a tied lm_head: row-major, no copy
        from memfit.llm.kernels.linear import use_row_major_linears

        chosen.num_row_major_linears = use_row_major_linears(model)
    elif chosen.cpu_linear == "onednn":
        from memfit.llm.models.packing import pack_linears_for_cpu

        chosen.num_packed_linears = pack_linears_for_cpu(model)
    elif chosen.cpu_linear == "upcast":  # no fusion: the weights stay the checkpoint's, uncopied
        from memfit.llm.kernels.upcast import use_upcast_linears

        chosen.num_upcast_linears = use_upcast_linears(model)
    elif device.type == "cpu":  # plain F.linear: on oneDNN too, so in row buckets, as the packed path's
        from memfit.llm.models.packing import row_bucket_plain_linears

        chosen.num_bucketed_linears = row_bucket_plain_linears(model)
    if device.type == "cpu":
        # Every oneDNN kernel the linears will build (packed, plain F.linear, the row-major kernel's rows past its
        # own; the head's up to its rows) now, as the ledger counts them (fallback_accounting.kernel_counts): the
        # process's memory then stops growing with new step sizes, and no step pays for building one
        from memfit.llm.models.packing import warm_row_buckets

        warm_row_buckets(model, options.max_rows or 10**9, options.head_rows or None)
        # Weights still mapped from the checkpoint (an untied embedding, norms, the row-major kernel's
        # matrices) are made resident now: the memory ledger counts them in full, and decode then never
        # faults a page in from the file.
        from memfit.memory.pages import file_mappings, populate_file_pages

        maps = file_mappings()
        for p in list(model.parameters()):
            populate_file_pages(p.detach(), maps)
    if options.cpu_kernels and device.type == "cpu":
        from memfit.llm.kernels.decode import CpuDecodeOps

        if CpuDecodeOps.available(dtype):
            model.set_ops(CpuDecodeOps(dtype))  # type: ignore[operator]
            chosen.cpu_kernels = True
    return chosen


def mlp_row_blocks(model: nn.Module) -> int:
    """Let each MLP whose projections are all memfit's blocked kernel run steps of many rows in blocks of
    `blocked.mlp_row_block(dtype)` rows (models/llama.py: MLP.row_block): a prefill chunk's gate/up intermediates
    are then held one block at a time. From LARGE_M rows on the kernels sum each row in the same order whatever
    the rows of the call, so the results are the same bits. Returns how many MLPs block."""
    from memfit.llm.kernels.blocked import BlockedLinear, mlp_row_block
    from memfit.llm.models.llama import MLP

    count = 0
    for m in model.modules():
        if not isinstance(m, MLP):
            continue
        projections = [getattr(m, name, None) for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, BlockedLinear) for p in projections if p is not None):  # fusion deletes gate, up
            m.row_block = mlp_row_block(projections_dtype(projections))
            count += 1
    return count


def projections_dtype(projections: list) -> torch.dtype:
    """The dtype of an MLP's blocked projections (the first present)."""
    return next(p.dtype for p in projections if p is not None)
