"""A decoder step's transients laid out in the step arena (memfit/memory/scratch.py), and which region holds what.

Every layer of a step of N rows writes its intermediates into the same four regions, so the step holds them
once, not once per layer (nor wherever the C heap found room). Lifetimes inside a layer (models/llama.py):

    RESIDUAL (N, C)   the residual stream, updated in place by each fused add + RMSNorm
    NORMED   (N, C')  a norm's output; the attention output (N, Hq*D) once q/k/v are made from it
    HIDDEN   (N, C)   o_proj's output, then the MLP's output (the layer's output, read by the next norm)
    WORK              q|k|v (N, Hq*D + 2 Hkv*D) until attention has run; then the MLP's gate|up of one row
                      block (rows, 2I), SiLU(gate) * up written over the gate half

with C' = max(C, Hq*D). Each region is read before the next writer in this order, so none holds two live
values at once. The MLP runs in row blocks (llama.MLP.row_block) of b..2b-1 rows from 2b rows on, so WORK
is sized for this step's largest block, not for N rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # not at run time: models/__init__ imports llama, which imports this module
    from memfit.llm.models.config import ModelConfig

RESIDUAL, NORMED, HIDDEN, WORK = "residual", "normed", "hidden", "work"
ATTN_OUT = NORMED  # the attention output goes where its input's norm was (read by q/k/v before attention runs)


def mlp_rows(rows: int, row_block: int) -> int:
    """Rows of the MLP's largest call in a step of `rows` (llama.MLP.forward's blocking)."""
    if not row_block or rows < 2 * row_block:
        return rows
    return row_block + rows % row_block


def step_regions(cfg: ModelConfig, rows: int, dtype: torch.dtype, row_block: int = 0) -> dict[str, int]:
    """Region name -> bytes for a step of `rows` rows (the padded step, as the model computes it)."""
    item = dtype.itemsize
    c, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    qkv = q + 2 * cfg.num_key_value_heads * cfg.head_dim
    mlp = mlp_rows(rows, row_block) * 2 * cfg.intermediate_size
    return {RESIDUAL: rows * c * item, NORMED: rows * max(c, q) * item, HIDDEN: rows * c * item,
            WORK: max(rows * qkv, mlp) * item}


def step_bytes(cfg: ModelConfig, rows: int, dtype: torch.dtype, row_block: int = 0) -> int:
    """What a step of `rows` rows takes of the arena (each region cache-line aligned)."""
    from memfit.memory.scratch import ScratchArena

    return ScratchArena.layout_bytes(step_regions(cfg, rows, dtype, row_block))
