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

**Blockwise** groups (`blockwise_groups`: an untied model's embedding, and its head while the logits'
gradients are smaller than the head's; a tied embedding on that same condition) never hold their whole
gradient: the backward hands the store a `PieceGrad` instead, which makes the gradient a block of vocabulary
rows at a time as the update reads it piece by piece, into a piece-sized slice of the buffer. The embedding's
rows come from the batch's tokens (units.embedding_grad_rows), the head's from its kept factors
(units.HeadRows), a tied embedding's from both. At 0.1B both are (32000, 768): 94 MiB each, the buffer's size,
which then falls to the largest layer's (27 MiB); at 0.5B (tied) the buffer held the embedding's 545 MB.
"""
from __future__ import annotations

from collections.abc import Callable
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
    blockwise: frozenset[int] = frozenset()  # groups whose slice is one piece, filled by a PieceGrad

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


def blockwise_groups(groups: list[Group], tied: bool, tokens: int, itemsize: int) -> frozenset[int]:
    """Groups whose gradient the update can take a block of rows at a time: an untied model's embedding (its
    gradient is the batch's token rows), and its head (last group) when the logits' gradients it keeps for
    that, tokens * V * itemsize bytes, are no more than its float32 gradient, V * C * 4 (above that the
    dense accumulator is the smaller). A tied embedding takes the head's gradient too: blockwise on the same
    condition, the head's factors then kept from the head to the embedding's backward (the whole backward),
    as the dense gradient would be."""
    width = groups[0].params[0][1][1]  # embed_tokens (V, C)
    head_fits = tokens * itemsize <= 4 * width
    if tied:
        return frozenset({0} if head_fits else set())
    return frozenset({0} | ({len(groups) - 1} if head_fits else set()))


def head_matrix_group(groups: list[Group], tied: bool) -> int:
    """The group holding the output matrix: a tied model's embedding (0), else the head (last)."""
    return 0 if tied else len(groups) - 1


def streamed_layout(groups: list[Group], units: list[list[int]], blockwise: frozenset[int] = frozenset(),
                    piece: int = 0) -> StreamedLayout:
    """The buffer's layout; a blockwise group takes one optimizer piece (`piece` elements) instead of its size."""
    if blockwise and piece <= 0:
        raise ValueError("blockwise gradients need the optimizer's piece size")
    numels = [min(g.numel, piece) if gi in blockwise else g.numel for gi, g in enumerate(groups)]
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
    return StreamedLayout(offsets, numels, spans, round_up(total, ALIGN), frozenset(blockwise))


class RowBlocks:
    """A (rows, cols) matrix's float32 gradient made `block` rows at a time by make(r0, r1) -> (r1 - r0, cols),
    added into consecutive ranges of its flat elements; one block is held at a time (the update reads the
    group in order, so each block is made once)."""

    def __init__(self, rows: int, cols: int, block: int, make: Callable[[int, int], torch.Tensor]) -> None:
        self.rows, self.cols, self.block, self.make = rows, cols, block, make
        self._at, self._acc = -1, None  # the block held, its (rows * cols,) flat values

    def add_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """out (hi - lo,) += flat elements [lo, hi) of the gradient."""
        pos = lo
        while pos < hi:
            b = pos // self.cols // self.block
            if b != self._at:
                r0 = b * self.block
                self._acc = None  # the previous block goes before the next is made
                self._acc = self.make(r0, min(r0 + self.block, self.rows)).reshape(-1).to(out.device)
                self._at = b
            base = b * self.block * self.cols
            end = min(hi, base + self._acc.numel())
            out[pos - lo : end - lo].add_(self._acc[pos - base : end - base])
            pos = end


class DenseGrad:
    """A gradient held whole (a small one: the final norm's), in any dtype."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat

    def add_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        out.add_(self.flat[lo:hi].to(out.device))


class PieceGrad:
    """A group's float32 gradient, made piece by piece for the update: parts (offset, numel, part) at their
    offsets in the group's flat order; elements no part covers are zero. Each element is 0 + its value, the
    add the flat buffer's zeroed slice receives, so the bits are the buffer's."""

    def __init__(self, parts: list[tuple[int, int, RowBlocks | DenseGrad]]) -> None:
        self.parts = parts

    def fill(self, start: int, n: int, out: torch.Tensor) -> None:
        """out (n,) = the group's gradient elements [start, start + n)."""
        out.zero_()
        for off, numel, part in self.parts:
            lo, hi = max(start, off), min(start + n, off + numel)
            if lo < hi:
                part.add_into(lo - off, hi - off, out[lo - start : hi - start])


def embedding_rows(tokens: torch.Tensor, rows: torch.Tensor, width: int,
                   base: Callable[[int, int], torch.Tensor] | None = None) -> Callable[[int, int], torch.Tensor]:
    """make(r0, r1) for RowBlocks: the embedding's float32 gradient on rows [r0, r1) from the batch's distinct
    tokens (U,) and their rows (U, C) (units.embedding_grad_rows), added as the dense gradient's index_add_ adds
    them: onto zero (each element 0 + its value), or, tied, onto base(r0, r1), the head's float32 rows
    (units.HeadRows.rows), which the dense buffer held when the embedding's rows were added."""

    def make(r0: int, r1: int) -> torch.Tensor:
        acc = base(r0, r1).cpu() if base is not None else torch.zeros((r1 - r0, width), dtype=torch.float32)
        sel = (tokens >= r0) & (tokens < r1)
        acc.index_add_(0, (tokens[sel] - r0).cpu(), rows[sel].to("cpu", torch.float32))
        return acc

    return make


def streams(design_streams: bool, tier: str, dtype: torch.dtype, placed: bool) -> bool:
    """Whether a run streams its gradients: the design asks for it, the state is offloaded (host or SSD; the
    `none` tier keeps plain tensors), no --placement (which places one flat buffer), and no loss scale whose
    overflow check must see every gradient before the first update (fp16)."""
    return design_streams and tier in ("host", "ssd") and dtype != torch.float16 and not placed
