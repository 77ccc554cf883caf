"""One model pass over chunks of several sequences, with the logits speculative decoding needs.

The draft's passes (the last position of each chunk) and the target's verification (every position of each
g+1-token chunk) both run here, through the same `CachedAttention` the runner uses for chunked prefill; a pass of
one-token decode rows goes through the runner's C++ decode stack where it has one.
"""
from __future__ import annotations

import torch

from memfit.llm.engine.runner import ModelRunner, bucket_tokens
from memfit.llm.kernels.attention import CachedAttention
from memfit.llm.kv.base import SeqStep


def forward(runner: ModelRunner, chunks: list[tuple[int, int, list[int]]], all_rows: bool) -> torch.Tensor:
    """Run `runner`'s model over chunks (seq_id, start, tokens) in one pass; the logits (R, V) of each chunk's
    last position (all_rows False) or of every position (True), in chunk order."""
    kv = runner.kv
    single = [i for i, c in enumerate(chunks) if len(c[2]) == 1 and c[1] > 0]  # decode rows go first
    if runner._by_slot:
        single.sort(key=lambda i: kv.slot_of(chunks[i][0]))
    singles = set(single)
    order = single + [i for i in range(len(chunks)) if i not in singles]
    ids: list[int] = []
    pos: list[int] = []
    steps: list[SeqStep] = []
    first_row = [0] * len(chunks)
    for i in order:
        seq_id, start, tokens = chunks[i]
        first_row[i] = len(ids)
        ids.extend(tokens)
        pos.extend(range(start, start + len(tokens)))
        steps.append(SeqStep(seq_id, start, len(tokens), tokens))
    num_real = len(ids)
    dev = runner.device
    model = runner.model
    if runner.stack is not None and len(single) == len(chunks) <= runner.stack.max_rows:
        # All one-token decode rows (the draft's passes after the first): the whole step in one C++ call.
        hidden = runner.stack.run(torch.tensor(ids, dtype=torch.long), kv.plan_step(steps))  # (B, C)
        return model.compute_logits(hidden.index_select(0, torch.tensor(first_row, device=dev)))  # (B, V)
    padded = bucket_tokens(num_real)  # bounded shapes, as ModelRunner.execute does
    ids.extend([0] * (padded - num_real))
    pos.extend([0] * (padded - num_real))
    attn = CachedAttention(kv, steps, len(single), model.scale, model.config.sliding_window, num_real,
                           runner.workspace, model.ops)
    hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                   attn)  # (N, C)
    if all_rows:
        rows = [first_row[i] + j for i in range(len(chunks)) for j in range(len(chunks[i][2]))]
    else:
        rows = [first_row[i] + len(chunks[i][2]) - 1 for i in range(len(chunks))]
    return model.compute_logits(hidden.index_select(0, torch.tensor(rows, device=dev)))  # (R, V)
