"""Where the fp32 weight gradients live in host memory: one whole-model buffer, or streamed group by group.

- **flat** (both ZeRO-Infinity designs, and any fp16 run): one buffer for every parameter, as ZeRO-3's
  offloaded `grad_partitions_flat_buffer`, zeroed at the start of a step. The optimizer runs after the
  whole backward, so fp16's overflow check can read every gradient before any weight changes.
- **streamed** (MemAscend's design when nothing checks for overflow: bf16 and fp32 compute have no loss
  scale): a group's gradient is complete once the last unit that reads the group has run its backward, and
  AdamW on that group needs nothing else, so the store updates the group right there and its bytes are
  free for the next group. The update's arithmetic is the same (same gradient, same AdamW, same step
  count), so the losses and the SSD traffic are unchanged; only the order in which groups are updated
  differs, and no group reads another's state.

The streamed buffer is planned once from the backward's order (head, last layer, ..., embedding): a group
is live from the first unit of the backward that reads it to the last one, and two groups whose live spans
do not overlap share bytes. Offsets are given greedily, largest group first, at the lowest offset free of
every overlapping group already placed (first fit by decreasing size). An untied Llama's groups are each
read by one unit, so the buffer is one group (the largest: the embedding or the output layer) instead of
all of them; a tied model's embedding is live from the head to the end of the backward, so the buffer is
the embedding plus the largest layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.memory.mapping import round_up
from memfit.train.finetune.units import Group

# Group offsets in elements, a multiple of this: a piece of the optimizer (a multiple of 4096 elements too)
# then starts on an O_DIRECT boundary, so its bytes can carry the piece's compute copy to the SSD.
ALIGN = 4096


@dataclass(frozen=True)
class StreamedLayout:
    offsets: list[int]  # per group, elements into the buffer
    numels: list[int]  # per group
    spans: list[tuple[int, int]]  # per group, (first, last) position in the backward's order of units
    total: int  # elements of the buffer

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per group, its (numel,) slice of `buf` (fp32, at least `total` elements)."""
        return [buf[o : o + n] for o, n in zip(self.offsets, self.numels)]


def backward_spans(units: list[list[int]], n_groups: int) -> list[tuple[int, int]]:
    """Per group, the first and last position in the backward's order of units (the head at 0, then the
    layers down to the embedding) at which a unit reads the group."""
    head = len(units) - 1
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for t, k in enumerate(range(head, -1, -1)):
        for gi in units[k]:
            first.setdefault(gi, t)
            last[gi] = t
    missing = [gi for gi in range(n_groups) if gi not in first]
    if missing:
        raise ValueError(f"groups {missing} are read by no unit")
    return [(first[gi], last[gi]) for gi in range(n_groups)]


def last_units(units: list[list[int]], n_groups: int) -> list[int]:
    """Per group, the unit whose backward completes its gradient (the lowest-numbered unit reading it): its
    last position in the backward's order, counted back from the head."""
    head = len(units) - 1
    return [head - last for _, last in backward_spans(units, n_groups)]


def streamed_layout(groups: list[Group], units: list[list[int]]) -> StreamedLayout:
    numels = [g.numel for g in groups]
    spans = backward_spans(units, len(groups))
    offsets = [0] * len(groups)
    placed: list[tuple[int, int, tuple[int, int]]] = []  # (start, end, span), elements
    for gi in sorted(range(len(groups)), key=lambda i: (-numels[i], i)):
        lo, hi = spans[gi]
        busy = sorted((s, e) for s, e, (a, b) in placed if a <= hi and lo <= b)
        at = 0
        for s, e in busy:
            if at + numels[gi] <= s:
                break
            at = max(at, round_up(e, ALIGN))
        offsets[gi] = at
        placed.append((at, at + numels[gi], spans[gi]))
    total = max((e for _, e, _ in placed), default=0)
    return StreamedLayout(offsets, numels, spans, round_up(total, ALIGN))


def streams(design_streams: bool, tier: str, dtype: torch.dtype, placed: bool) -> bool:
    """Whether a run streams its gradients: the design asks for it, the state is offloaded (host or SSD; the
    `none` tier keeps plain tensors), no --placement (which places one flat buffer), and no loss scale whose
    overflow check must see every gradient before the first update (fp16)."""
    return design_streams and tier in ("host", "ssd") and dtype != torch.float16 and not placed
