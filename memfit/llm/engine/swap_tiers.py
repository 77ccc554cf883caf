"""The engine's swap tiers (kv/swap.py, and kv/swap_ssd.py below it): their size, building them, and their share
of the engine's stats and memory timeline."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.llm.engine.config import EngineConfig
from memfit.llm.kernels.staged_io import aio_ring_bytes
from memfit.llm.kv.base import KVCacheManager
from memfit.llm.models.config import ModelConfig
from memfit.memory.budget import MemoryBudget, Tier, parse_swap_space
from memfit.memory.extent_store import STAGE

if TYPE_CHECKING:
    from memfit.llm.kv.swap import SwapSpace

__all__ = ["SSD_STAGING_OWNER", "build_swap", "ssd_staging_bytes", "swap_bytes", "swap_stats", "tier_timeline"]

SSD_STAGING_OWNER = "ssd_staging"  # the ledger owner of the SSD tier's O_DIRECT staging buffers


def swap_bytes(config: EngineConfig) -> int:
    """The host swap tier's size; 0 when preemption only recomputes."""
    if config.preemption_mode == "recompute":
        return 0
    return parse_swap_space(config.swap_space if config.swap_space is not None else 4)


def ssd_staging_bytes(config: EngineConfig, device: torch.device) -> int:
    """What the SSD tier's O_DIRECT I/O may hold for each thread that may do SSD I/O at once (the engine thread and
    each of swap_threads): one STAGE-byte staging buffer (memory/direct_staging.py) and one AIO completion ring
    (kernels/staged_io.aio_ring_bytes, 20 KiB here). Counted in the ledger on a CPU only (there the ledger is the
    process's RAM; on CUDA it is device memory). 0 without an SSD tier or where O_DIRECT does not exist; if the
    file system refuses it, build_swap gives the reservation back."""
    if device.type != "cpu" or config.preemption_mode == "recompute" or config.swap_ssd_path is None:
        return 0
    import os

    return (config.swap_threads + 1) * (STAGE + aio_ring_bytes()) if hasattr(os, "O_DIRECT") else 0


def build_swap(config: EngineConfig, kv: KVCacheManager, ledger: MemoryBudget, device: torch.device,
               model: nn.Module, mc: ModelConfig) -> SwapSpace | None:
    """The host tier swapped KV goes to (kv/swap.py), with its own budget: on a CPU it is the same RAM as
    everything else, so the budget is a share of the whole-process ledger (set aside before the KV share
    when --swap-space is given); on CUDA it is pinned host memory, a budget of its own. None: no swapping."""
    nbytes = swap_bytes(config)
    if not nbytes:
        return None
    from memfit.llm.kv.swap import CostModel, SwapSpace

    parent = ledger if device.type == "cpu" else None
    budget = MemoryBudget(nbytes, Tier.HOST, name="swap_space", parent=parent)
    params = sum(p.numel() for p in model.parameters())
    cost = CostModel(params, mc.num_hidden_layers, mc.num_attention_heads * mc.head_dim,
                     flops_per_s=2e10 if device.type == "cpu" else 2e13)
    ssd = None
    if config.swap_ssd_path is not None:  # below the host tier: a preallocated file, checked at start
        from memfit.llm.kv.swap_ssd import SSDTier

        space = config.swap_ssd_space
        ssd = SSDTier(config.swap_ssd_path, parse_swap_space(space if space is not None else 16),
                      threads=config.swap_threads, prewrite=config.swap_ssd_prewrite)
        staged = ledger.by_owner().get(SSD_STAGING_OWNER, 0)  # ledger.reserve_ssd_staging, on a CPU
        if staged:
            if ssd.store.direct:  # given back if the first O_DIRECT write is refused (on whichever thread)
                ssd.store.on_fallback = lambda: ledger.release(staged, SSD_STAGING_OWNER)
            else:  # the file system refused O_DIRECT at open: buffered I/O, no staging buffers
                ledger.release(staged, SSD_STAGING_OWNER)
    # the tier keeps the pages it has committed (warm for the next swap-out) only where its budget is set aside for
    # it: on a CPU without --swap-space the KV cache draws on the same ledger room, so freed pages go back at once
    keep = 0 if parent is not None and config.swap_space is None else None
    return SwapSpace(kv, budget, cost, threads=config.swap_threads, reuse=config.swap_reuse, ssd=ssd,
                     keep_bytes=keep, region=True, warm_ahead=True)


def tier_timeline(swap: SwapSpace | None) -> dict:
    """The swap tiers' share of a timeline row: what each holds now, and its limit."""
    if swap is None:
        return {}
    row = {"swap_host_resident_bytes": swap.stats.resident_bytes, "swap_host_limit_bytes": swap.budget.limit_bytes,
           "swap_host_region_bytes": region_bytes(swap)}
    if swap.ssd is not None:
        row.update(swap_ssd_resident_bytes=swap.ssd.stats.resident_bytes,
                   swap_ssd_limit_bytes=swap.ssd.budget.limit_bytes)
    return row


def region_bytes(swap: SwapSpace) -> int:
    """What the host tier's region holds beyond its chunks' bytes (warm free pages, page rounding, its page map and
    extent tables): RSS in its budget."""
    from memfit.memory.host_region import REGION_OWNER

    return swap.budget.by_owner().get(REGION_OWNER, 0)


def swap_stats(swap: SwapSpace | None) -> dict:
    """The `swap` entry of LLMEngine.stats(): per tier, then the reuse and latency counters."""
    if swap is None:
        return {}
    st = swap.stats
    from memfit.llm.kv.swap import SWAP_SECONDS_BUCKETS

    tiers = [("host", st, swap.budget)]
    if swap.ssd is not None:
        tiers.append(("ssd", swap.ssd.stats, swap.ssd.budget))
    per_tier = [{"tier": name, "out_bytes": s.out_bytes, "in_bytes": s.in_bytes, "out_ops": s.out_ops,
                 "in_ops": s.in_ops, "resident_bytes": s.resident_bytes, "limit_bytes": b.limit_bytes,
                 "io_errors": s.io_errors, "seconds_sum": s.seconds_sum} for name, s, b in tiers]
    per_tier[0]["region_bytes"] = region_bytes(swap)
    if swap.ssd is not None:  # O_DIRECT in use, or why not (memory/extent_store.py)
        per_tier[1].update(direct_io=swap.ssd.store.direct, direct_io_fallback=swap.ssd.store.direct_fallback,
                           checksum=swap.ssd.checksum, syscall_seconds=swap.ssd.syscall_seconds)
    return {**per_tier[0], "tiers": per_tier, "reused_tokens": st.reused_tokens,
            "kept_evictions": st.kept_evictions, "swap_ins": st.swap_ins, "merges": st.merges,
            "seconds_buckets": SWAP_SECONDS_BUCKETS,
            "seconds_counts": list(st.seconds_counts), "seconds_sum": st.seconds_sum,
            "async_swap_ins": swap.async_swap_ins, "async_swap_outs": swap.async_swap_outs}
