"""One model pass over chunks of several sequences, with the logits speculative decoding needs.

The draft's passes (the last position of each chunk) and the target's verification (every position of each
g+1-token chunk) both run here. Where the runner has the C++ decode stack (kernels/stack.py), short chunks that
continue their sequences (one-token rows, verification's g+1, the draft's first pass) go through it in one call,
each row attending causally within its chunk; the rest (the draft's catch-up prefill, large batches) goes through
the same `CachedAttention` the runner uses for chunked prefill.
"""
from __future__ import annotations

import torch

from memfit.llm.engine.runner import ModelRunner, bucket_tokens
from memfit.llm.kernels.attention import CachedAttention
from memfit.llm.kv.base import SeqStep

SHORT_CHUNK = 16  # tokens: a chunk up to this long continuing its sequence runs through the decode stack


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
    stack = runner.stack
    if stack is not None and len(single) == len(chunks) <= stack.max_rows:
        # All one-token decode rows (the draft's passes after the first): the whole step in one C++ call.
        hidden = stack.run(torch.tensor(ids, dtype=torch.long), kv.plan_step(steps))  # (B, C)
        return model.compute_logits(hidden.index_select(0, torch.tensor(first_row, device=dev)))  # (B, V)
    if stack is not None and all(c[1] > 0 and len(c[2]) <= SHORT_CHUNK for c in chunks):
        # Short chunks that continue their sequences (verification: the last token and g drafts each; the
        # draft's first pass: the one or two tokens it has not seen): the same C++ call, each row attending to
        # its sequence up to its own position, at about the cost of a decode step rather than a prefill chunk.
        # More rows than the stack's matmuls are measured for go in several calls of whole sequences (each
        # row's arithmetic is its own, so the split changes no result).
        parts, first = [], 0
        for lo, hi in _groups([st.num_new for st in steps], stack.max_chunk_rows):
            counts = [st.num_new for st in steps[lo:hi]]
            parts.append(stack.run(torch.tensor(ids[first : first + sum(counts)], dtype=torch.long),
                                   kv.plan_step(steps[lo:hi]), counts))  # (rows, C)
            first += sum(counts)
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts)  # (N, C)
        return model.compute_logits(hidden.index_select(0, torch.tensor(_rows(chunks, first_row, all_rows), device=dev)))
    padded = bucket_tokens(num_real)  # bounded shapes, as ModelRunner.execute does
    ids.extend([0] * (padded - num_real))
    pos.extend([0] * (padded - num_real))
    attn = CachedAttention(kv, steps, len(single), model.scale, model.config.sliding_window, num_real,
                           runner.workspace, model.ops)
    with runner.step_scratch(padded):
        hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                       attn)  # (N, C), in the step arena where the runner has one
        picked = hidden.index_select(0, torch.tensor(_rows(chunks, first_row, all_rows), device=dev))
    return model.compute_logits(picked)


def _groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive runs [lo, hi) of `sizes` whose sums stay within `limit` (a size above it runs alone)."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > limit:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    out.append((lo, len(sizes)))
    return out


def _rows(chunks: list[tuple[int, int, list[int]]], first_row: list[int], all_rows: bool) -> list[int]:
    """The hidden rows whose logits `forward` returns, in chunk order: every position, or each chunk's last."""
    if all_rows:
        return [first_row[i] + j for i in range(len(chunks)) for j in range(len(chunks[i][2]))]
    return [first_row[i] + len(chunks[i][2]) - 1 for i in range(len(chunks))]
