"""The host-memory plan of a fine-tuning run, before anything is allocated: pools from the design's own
policies (the same functions that size the real pools), activations from the model's shapes.

`--memory-budget` is checked against its total, and a budget below it is refused with this breakdown (as
`memfit fit` prints one for inference), so the user sees which pool to shrink.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.llm.models import ModelConfig
from memfit.memory.budget import format_bytes
from memfit.train.finetune.designs import HostMemoryDesign
from memfit.train.finetune.gradients import StreamedLayout, head_matrix_group
from memfit.train.finetune.units import HEAD_GRAD_ROWS, LOGIT_BYTES_PER_ENTRY, Group
from memfit.train.finetune.vocab import BLOCK_TOKENS


class BudgetTooSmall(MemoryError):
    """The run's predicted host memory exceeds --memory-budget; the message holds the breakdown."""


@dataclass
class Plan:
    pools: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.pools.values())

    def table(self) -> str:
        width = max(len(k) for k in self.pools)
        rows = [f"  {k:<{width}}  {format_bytes(v):>12}" for k, v in self.pools.items()]
        return "\n".join(rows + [f"  {'total':<{width}}  {format_bytes(self.total):>12}"])


def plan(groups: list[Group], model_cfg: ModelConfig, tier: str, design: HostMemoryDesign,
         dtype: torch.dtype, batch_size: int, seq_len: int, in_flight: int, recompute: bool,
         loss_chunk: int | None = None, streamed: StreamedLayout | None = None) -> Plan:
    itemsize = torch.empty((), dtype=dtype).element_size()
    copy = itemsize if dtype != torch.float32 else 0
    n = sum(g.numel for g in groups)
    pools: dict[str, int] = {}
    if streamed is not None:  # the groups live at once in the backward (gradients.py)
        pools["gradients (streamed)"] = design.reserved(4 * streamed.total)
    else:
        pools["gradients"] = 4 * n if tier == "none" else design.reserved(4 * n)
    if tier == "none":
        pools["model states"] = (12 + copy) * n
    elif tier == "host":
        pools["model states"] = sum(design.reserved(4 * g.numel) * 3 + (design.reserved(copy * g.numel) if copy else 0)
                                    for g in groups)
    else:
        classes = [design.param_classes(groups, itemsize, in_flight), design.block_classes(groups, itemsize)]
        pools["param swap pool"] = sum(b * c for cl in classes for b, c in cl.items())
        pools["optimizer swap pool"] = sum(b * c for b, c in design.optimizer_classes(groups, copy).items())
        if design.host_param_copy(groups):
            pools["parameter copy (flat)"] = design.reserved(itemsize * n)
        if design.fresh_first_moments:
            pools["first-step Adam moments (transient)"] = 8 * design.optimizer_piece(groups)
    if dtype == torch.float16:  # the only dtype with a loss scale to check (trainer.py)
        pools["overflow check temporaries"] = design.overflow_temp_bytes(n)
    tokens = batch_size * seq_len
    c, v, i = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.intermediate_size
    layers = model_cfg.num_hidden_layers
    # Saved between units: (x, residual) per layer when recomputing; the whole graph otherwise (about
    # 10 C + 3 I values per token per layer: norms, q/k/v/o, attention output, gate/up/act).
    per_layer = 2 * c if recompute else 10 * c + 3 * i
    pools["activations (estimate)"] = tokens * itemsize * (per_layer * layers + 10 * c + 3 * i)
    # One chunk of the head's logits at a time (units.py): logits, float32 copy, log-softmax, gradients; with
    # vocab_blocks one block of rows for a pass of target tokens (vocab.py)
    chunk = tokens if loss_chunk is None else min(tokens, loss_chunk)
    pools["logits and loss (estimate)"] = (min(tokens, BLOCK_TOKENS) * min(v, HEAD_GRAD_ROWS) if design.vocab_blocks
                                           else chunk * v) * LOGIT_BYTES_PER_ENTRY
    if streamed is not None and head_matrix_group(groups, model_cfg.tie_word_embeddings) in streamed.blockwise:
        # the head's kept factors (units.HeadRows): the logits' gradients, and one float32 block of rows made
        # from them with its compute-dtype product
        pools["head logit gradients (kept)"] = tokens * v * itemsize + HEAD_GRAD_ROWS * c * (4 + itemsize)
    return Plan(pools)


def check_budget(p: Plan, budget_bytes: int | None, available_bytes: int | None = None) -> None:
    """Refuse a plan above --memory-budget; without one, a plan above `available_bytes` (the host memory available
    now, for a CPU run): --batch-size 100000 on a tiny model planned 145 GiB and went on until the kernel killed it."""
    if budget_bytes is None and available_bytes is not None and p.total > available_bytes:
        raise BudgetTooSmall(
            f"this run's minimum of {format_bytes(p.total)} is more than the {format_bytes(available_bytes)} of host "
            f"memory available now:\n{p.table()}\nlower --batch-size/--seq-len or offload further "
            "(--offload host|ssd); --memory-budget plans for a budget you choose"
        )
    if budget_bytes is not None and p.total > budget_bytes:
        raise BudgetTooSmall(
            f"--memory-budget {format_bytes(budget_bytes)} is below this run's minimum of {format_bytes(p.total)}:\n"
            f"{p.table()}\nraise the budget, offload further (--offload host|ssd), or lower --batch-size/--seq-len"
        )
