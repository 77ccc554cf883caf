"""Runs of consecutive slots: decode attention over a fixed-stride cache whose batch slots are not consecutive,
with no gather (attention.attend_slot_runs attends each run over its view).

The virtual cache keeps sequence s at `K[l][s]`, one strided view per layer, so a decode batch whose slots are
lo, lo+1, ..., hi-1 is one view `K[l][lo:hi, :L]`. Serving rarely keeps them so: best-fit slot reuse leaves
gaps, and a batch's order need not be slot order. Copying the batch's rows into one contiguous tensor (what
`context_batch` does then) costs as much as the paged cache's gather. Instead the batch is split into runs of
consecutive slots, and each run is attended over its own view: K/V are never copied, only the query rows of a
run that is not in row order are picked out (B x Hq x D, tiny next to the context). Each run also reads only up
to its own longest sequence (padded), not the batch's. This is the PyTorch path (GPUs, and CPUs without memfit's
kernels, which take per-row slots directly).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SlotRun:
    rows: list[int]  # the batch rows of this run, in slot order
    lo: int  # its first slot: rows[i] reads slot lo + i
    length: int  # positions read: the run's longest sequence, padded
    lens: torch.Tensor | None  # (n,) valid lengths, None when every row fills `length`
    index: torch.Tensor | None  # rows as a tensor, None when they are a contiguous ascending range


def slot_runs(slots: list[int], ends: list[int], pad: int, max_len: int, device: torch.device) -> list[SlotRun]:
    """Group batch rows (row i in slot slots[i], ends[i] tokens long) into runs of consecutive slots."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if slots[i] == slots[groups[-1][-1]] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    runs = []
    for rows in groups:
        run_ends = [ends[i] for i in rows]
        length = min(max_len, -(-max(run_ends) // pad) * pad)
        lens = None if all(e == length for e in run_ends) else torch.tensor(run_ends, device=device)
        in_order = rows == list(range(rows[0], rows[0] + len(rows)))
        index = None if in_order else torch.tensor(rows, device=device)
        runs.append(SlotRun(rows, slots[rows[0]], length, lens, index))
    return runs
