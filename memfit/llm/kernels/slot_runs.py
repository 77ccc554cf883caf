"""Runs of consecutive slots: decode attention over a fixed-stride cache whose batch slots are not consecutive,
with no gather (decode_batch.attend_slot_runs attends each run over its view).

The virtual cache keeps sequence s at `K[l][s]`, one strided view per layer, so a decode batch whose slots are
lo, lo+1, ..., hi-1 is one view `K[l][lo:hi, :L]`. Serving rarely keeps them so: best-fit slot reuse leaves
gaps, and a batch's order need not be slot order. Copying the batch's rows into one contiguous tensor (what
`context_batch` does then) costs as much as the paged cache's gather. Instead the batch is split into runs of
consecutive slots, and each run is attended over its own view: K/V are never copied, only the query rows of a
run that is not in row order are picked out (B x Hq x D, tiny next to the context). Each run also reads only up
to its own longest sequence (padded), not the batch's. This is the PyTorch path (GPUs, and CPUs without memfit's
kernels, which take per-row slots directly).

Bridging (`bridge=True`, chosen on CUDA): a batch whose slots have gaps (0, 2, 4, ...) makes one run a row, and
on a GPU each run is a kernel launch of its own (measured on an H200, benchmarks/kv_cache.py: batch 32 with
gapped, shuffled slots 3x slower than the paged cache's one gather). Runs are then joined across gaps while a
span holds no more empty slots than rows: one view `K[l][lo:lo+span]`, the query rows scattered to their slots'
positions, the gap slots attending to one position (finite garbage, never read back). It reads at most twice
the rows' K/V, in one launch. The gap slots' pages must be readable: the cache maps its scratch page there on
CUDA (`VirtualKVCache.make_slots_readable`).
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
    span: int  # slots the run's view covers; more than len(rows) when it bridges gaps
    pos: torch.Tensor | None = None  # (n,) each row's slot - lo, when it bridges gaps

    @property
    def gaps(self) -> list[int]:
        """The empty slots a bridging run reads (none otherwise)."""
        taken = {self.lo + p for p in (self.pos.tolist() if self.pos is not None else range(len(self.rows)))}
        return [s for s in range(self.lo, self.lo + self.span) if s not in taken]


def make_gaps_readable(kv, runs: list[SlotRun]) -> None:
    """Have the cache make the empty slots bridged runs read safe to read (their first `length` positions)."""
    gaps = [(s, run.length) for run in runs for s in run.gaps]
    if gaps:
        kv.make_slots_readable(gaps)


def slot_runs(slots: list[int], ends: list[int], pad: int, max_len: int, device: torch.device,
              bridge: bool = False) -> list[SlotRun]:
    """Group batch rows (row i in slot slots[i], ends[i] tokens long) into runs of consecutive slots; with
    `bridge`, join runs across gaps while a span holds no more empty slots than rows (module docstring)."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        lo = slots[groups[-1][0]]
        if slots[i] == slots[groups[-1][-1]] + 1 or (bridge and slots[i] - lo + 1 <= 2 * (len(groups[-1]) + 1)):
            groups[-1].append(i)
        else:
            groups.append([i])
    runs = []
    for rows in groups:
        run_ends = [ends[i] for i in rows]
        length = min(max_len, -(-max(run_ends) // pad) * pad)
        lo, span = slots[rows[0]], slots[rows[-1]] - slots[rows[0]] + 1
        if span > len(rows):  # bridges gaps: lengths per slot of the span, a gap attends to one position
            pos = [slots[i] - lo for i in rows]
            span_ends = [1] * span
            for p, e in zip(pos, run_ends):
                span_ends[p] = e
            runs.append(SlotRun(rows, lo, length, torch.tensor(span_ends, device=device),
                                torch.tensor(rows, device=device), span, torch.tensor(pos, device=device)))
            continue
        lens = None if all(e == length for e in run_ends) else torch.tensor(run_ends, device=device)
        in_order = rows == list(range(rows[0], rows[0] + len(rows)))
        index = None if in_order else torch.tensor(rows, device=device)
        runs.append(SlotRun(rows, lo, length, lens, index, len(rows)))
    return runs
