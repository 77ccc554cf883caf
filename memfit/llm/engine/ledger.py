"""The engine's memory ledger: its size, the fixed parts reserved in it, the KV cache's share and watermark.

The ledger is sized from the memory available *before* the model loads; every part (accounting.py's formulas)
is reserved in it before it is allocated, so a model that cannot fit is refused before a byte of it is read,
and what is left is the KV cache's share. LLMEngine.__init__ makes these calls in that order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memfit.llm.engine import accounting, arena_accounting, fallback_accounting
from memfit.llm.engine.config import EngineConfig
from memfit.llm.engine.swap_tiers import SSD_STAGING_OWNER, ssd_staging_bytes, swap_bytes
from memfit.llm.kernels.backends import BackendOptions, choose_cpu_linear
from memfit.llm.models.config import ModelConfig, parse_dtype
from memfit.memory.budget import (MemoryBudget, MemoryBudgetExceeded, Tier, available_memory, format_bytes,
                                  parse_budget, resolve_budget)

__all__ = ["DEFAULT_MEMORY_FRACTION", "engine_head_rows", "kv_share_bytes", "ledger_bytes", "plan_memory", "reserve_fixed",
           "reserve_ssd_staging", "watermark_bytes"]

DEFAULT_MEMORY_FRACTION = 0.9  # the ledger without --memory-budget: this share of the memory available at start


def ledger_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.memory_budget is not None:
        return resolve_budget(config.memory_budget, Tier.DEVICE, str(device))
    return max(1, int(DEFAULT_MEMORY_FRACTION * available_memory(Tier.DEVICE, str(device))))


def engine_head_rows(config: EngineConfig) -> int:
    """The most rows one call of the target's head takes (fallback_accounting.head_rows): a sampled row a
    sequence, or the verification rows of speculative decoding."""
    if not config.speculative_model:
        return config.max_num_seqs
    tree = config.speculative_tree if isinstance(config.speculative_tree, tuple) else None
    return fallback_accounting.head_rows(config.max_num_seqs, config.num_speculative_tokens or 1, tree)


def plan_memory(config: EngineConfig, device: torch.device, path: str | Path, stored: ModelConfig,
                dtype: torch.dtype, options: BackendOptions, max_model_len: int,
                sharded: bool) -> accounting.MemoryPlan:
    """What the ledger will hold besides the KV cache, from the same formulas `memfit fit` adds up. `sharded`:
    this rank loads its own shard (tensor parallelism), so no weight is used as mapped from the checkpoint."""
    cpu_linear = choose_cpu_linear(options, device, dtype)
    mapped = not sharded and parse_dtype(stored.torch_dtype) == dtype  # the checkpoint's tensors used in place
    onednn = dict(head_rows=engine_head_rows(config), mapped=mapped, fused=options.fuse)  # its kernels (shape_cache)
    runtime = {"runtime_bytes": 0, "runtime_baseline_bytes": 0}
    if config.memory_budget is not None:  # a bound the user asked for: measure the runtime's share (cached)
        from memfit.llm.engine.calibrate import runtime_bytes

        kernels = options.cpu_kernels and device.type == "cpu"
        runtime = runtime_bytes(device.type, str(dtype).removeprefix("torch."), cpu_linear, kernels,
                                batch=config.max_num_seqs)
    return accounting.MemoryPlan(
        weights_bytes=accounting.weights_bytes(stored, dtype, cpu_linear, device.type, mapped=mapped),
        tokenizer_bytes=accounting.tokenizer_bytes(path),
        runtime_bytes=runtime["runtime_bytes"],
        step_bytes=accounting.step_bytes(stored, dtype, config.max_num_batched_tokens, max_model_len,
                                         config.max_num_seqs,
                                         accounting.attention_in_place(device.type, dtype, options.cpu_kernels),
                                         0 if sharded else accounting.mlp_row_block(device.type, cpu_linear, dtype),
                                         # the step arena: not under tensor parallelism
                                         arena=not sharded and arena_accounting.LEDGER_USES_ARENA,
                                         packed=fallback_accounting.pads_rows(cpu_linear, device.type)),
        kv_bytes=0,
        runtime_baseline_bytes=runtime["runtime_baseline_bytes"],
        shape_cache_bytes=fallback_accounting.shape_cache_bytes(stored, cpu_linear, config.max_num_batched_tokens,
                                                                device.type, measure=config.memory_budget is not None,
                                                                **onednn),
        kernel_counts=(fallback_accounting.kernel_counts(stored, cpu_linear, config.max_num_batched_tokens, **onednn)
                       if device.type == "cpu" else {}),
    )


def reserve_fixed(ledger: MemoryBudget, plan: accounting.MemoryPlan) -> None:
    """Reserve the plan's fixed parts in the ledger, or refuse (MemoryBudgetExceeded, with the breakdown) when
    they leave no room for the KV cache."""
    parts = {"weights": plan.weights_bytes, "tokenizer": plan.tokenizer_bytes, "runtime": plan.runtime_bytes,
             "step": plan.step_bytes}
    if plan.shape_cache_bytes:  # oneDNN's per-shape kernels (packed oneDNN or plain F.linear)
        parts["shape_cache"] = plan.shape_cache_bytes
    one_page = 4096  # at least some KV: a model that fits with no room for a token is of no use
    if plan.fixed_bytes + one_page > ledger.limit_bytes:
        shown = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
        raise MemoryBudgetExceeded(
            f"the memory budget ({format_bytes(ledger.limit_bytes)}) is too small for this model and "
            f"configuration: {shown} leave no room for the KV cache. Raise --memory-budget, or lower "
            "--max-num-batched-tokens / --max-model-len / --max-num-seqs (the step reservation), or use a "
            "smaller dtype (`memfit fit` shows the breakdown)."
        )
    for owner, nbytes in parts.items():
        ledger.reserve(nbytes, owner)


def reserve_ssd_staging(config: EngineConfig, ledger: MemoryBudget, device: torch.device) -> int:
    """Reserve the SSD tier's O_DIRECT staging buffers (swap_tiers.ssd_staging_bytes: (swap_threads + 1) x (1 MiB
    and an AIO ring), on a CPU) in the ledger under "ssd_staging", before the KV share is computed; build_swap
    gives them back if O_DIRECT turns out not to be in use. Returns the bytes reserved; a ledger without room for them is refused."""
    nbytes = ssd_staging_bytes(config, device)
    if nbytes and not ledger.try_reserve(nbytes, SSD_STAGING_OWNER):
        raise MemoryBudgetExceeded(
            f"the SSD swap tier's O_DIRECT staging buffers ({format_bytes(nbytes)}: 1 MiB and an AIO ring for the "
            f"engine thread and each of --swap-threads {config.swap_threads}) do not fit in the memory budget "
            f"({format_bytes(ledger.available_bytes)} left after the model); raise --memory-budget or lower "
            "--swap-threads")
    return nbytes


def kv_share_bytes(config: EngineConfig, ledger: MemoryBudget, device: torch.device, all_slots_bytes: int,
                   draft_kv_bytes: int = 0) -> int:
    """The KV cache's share: what the ledger has left (less the draft's KV share and, on a CPU, an explicit
    host swap tier), capped by kv_budget or by what every slot could hold at full length
    (`all_slots_bytes`: max_num_seqs sequences at max_model_len, with the cache's page or block rounding, and
    what the cache charges beside them: KVCacheManager.all_slots_bytes)."""
    left = ledger.available_bytes - draft_kv_bytes  # the draft's KV share is set aside (engine/draft.py)
    swap = swap_bytes(config) if device.type == "cpu" and config.swap_space is not None else 0
    if swap:
        left -= swap  # an explicit host swap tier is set aside first (same RAM on a CPU)
        if left <= 0:
            raise MemoryBudgetExceeded(
                f"--swap-space {format_bytes(swap)} leaves no room for the KV cache in the memory "
                f"budget ({format_bytes(ledger.available_bytes)} left after the model); lower it")
    if config.kv_budget is not None:
        cap = resolve_budget(config.kv_budget, Tier.DEVICE, str(device))
    else:  # room for every sequence slot at full length
        cap = all_slots_bytes
    return max(1, min(cap, left))


def watermark_bytes(spec: str | int | float, kv_limit_bytes: int) -> int:
    """The KV bytes idle reclaim leaves committed: bytes, or a fraction of the KV share; "0" turns it off."""
    if spec in ("0", 0):
        return 0
    value = parse_budget(spec)
    return int(value * kv_limit_bytes) if isinstance(value, float) else value
