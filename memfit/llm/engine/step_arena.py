"""The engine's step arena: one ScratchArena (memfit/memory/scratch.py) for every model pass of the target and the
draft, sized for the largest step the scheduler can form and carved out of the ledger's step reservation.

A pass of N rows lays its intermediates out in four regions (kernels/scratch_layout.py) that every layer reuses,
so what a step holds beside the KV cache is that layout, committed when a step first needs it, instead of whatever
the C heap grows to. The target and the draft never run at once, so they share it. It is built where memfit's CPU
kernels run (they write into `out=`), outside tensor parallelism (its shards' passes keep their own tensors).

Warm between its steps (keep_bytes None, fit_each_step): the pages of one step stay committed for the next, which
gives back only those above its own layout before it runs; a decode step, which runs outside the arena (the
runner's decode stack), gives them all back before it runs (ModelRunner.execute), so no decode holds a prefill's
layout (the peak is that of giving everything back after each step); and they go back when the engine has been
idle for `kv_reclaim_idle_s` (LLMEngine.maintain, with the C heap's trim: an allocator's decay). The
offline `LLM` API runs no maintenance between `generate()` calls, so there the last step's layout stays committed
until the next call, as its idle KV slots do (`LLM.close()` or a server's idle loop gives them back). Given back after every step, a prefill step paid a page fault per
4 KiB of its layout each time (MADV_POPULATE_WRITE, ~2.4 us a page here); the prefill benchmark's 32 x 128-token
batch (two 2048-token steps, then a 1-prompt batch) spent ~0.02 s of ~3.2 s committing them
(docs/benchmarks.md). The ledger reserves the whole capacity up front either way, so keeping the pages changes
what the process holds between steps, never what the budget allows.
"""
from __future__ import annotations

import torch

from memfit.llm.engine.arena_accounting import arena_capacity_bytes
from memfit.memory.budget import MemoryBudget
from memfit.memory.mapping import round_up
from memfit.memory.scratch import ScratchArena
from memfit.memory.vmem import VirtualArena

OWNER = "step_scratch"  # its reservation in the ledger, moved there from "step"


def row_block(model: torch.nn.Module) -> int:
    """The MLP's row block of `model` (models/llama.py: MLP.row_block), 0 for whole steps."""
    layers = model.model.layers
    return getattr(layers[0].mlp, "row_block", 0) if len(layers) else 0


def capacity_bytes(models: list[torch.nn.Module], max_num_batched_tokens: int) -> int:
    """The arena any step of any of `models` needs (rows padded as the runner pads them): the largest layout of
    every step size, in whole pages (arena_accounting.arena_capacity_bytes: not always the largest step's)."""
    return max(arena_capacity_bytes(m.config, m.model.norm.weight.dtype, max_num_batched_tokens, row_block(m))
               for m in models)


def build(ledger: MemoryBudget, models: list[torch.nn.Module], device: torch.device, max_num_batched_tokens: int,
          tp: object | None = None) -> ScratchArena | None:
    """The arena for `models`' passes, its capacity moved in `ledger` from "step" to OWNER; None where it does not
    apply (not memfit's CPU kernels, a GPU, tensor parallelism). The capacity is at most the step reservation: a
    step whose layout exceeds it (none the reservation's formula allows) runs on ordinary tensors."""
    if tp is not None or device.type != "cpu" or not all(hasattr(m.ops, "decode_attention") for m in models):
        return None
    held = ledger.by_owner().get("step", 0)
    page = VirtualArena.page_size_for(device)
    cap = min(round_up(capacity_bytes(models, max_num_batched_tokens), page), held // page * page)
    if cap <= 0:
        return None
    # whole pages: its capacity is cap; kept warm, fitted to each step
    arena = ScratchArena(cap, device, owner=OWNER, keep_bytes=None, fit_each_step=True)
    ledger.release(arena.capacity, "step")
    ledger.reserve(arena.capacity, OWNER)
    return arena
