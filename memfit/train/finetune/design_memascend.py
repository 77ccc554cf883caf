"""MemAscend's host-memory policies (Liaw and Chen, arXiv 2505.23254): size-class pools from the model's own
tensor shapes, exact aligned allocation, a fused overflow check, preallocated SSD extents; plus this
project's streamed and blockwise gradients and vocabulary blocks. designs.py has the comparison with
ZeRO-Infinity.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from memfit.memory.aio import ExtentFile
from memfit.memory.hostpool import IO_ALIGN, HostBuffer, aligned_buffer
from memfit.memory.mapping import round_up
from memfit.train.finetune.design_base import PIECE_ALIGN, HostMemoryDesign
from memfit.train.finetune.units import Group, unit_groups
from memfit.train.finetune.vocab import BLOCK_SLOTS, block_slot_bytes

OVERFLOW_CHUNK = 1 << 16  # elements per pass of the fused check: temporaries of ~7 bytes each, L2-resident


class MemAscend(HostMemoryDesign):
    """MemAscend's policies (Liaw and Chen, arXiv 2505.23254): adaptive size-class pools, exact aligned
    allocation, a fused overflow check, preallocated SSD extents."""

    name = "memascend"
    stream_gradients = True
    blockwise_gradients = True
    vocab_blocks = True
    update_depth = 3  # piece sets in flight: read one ahead and write one behind the piece AdamW runs on

    def host_buffer(self, nbytes: int) -> HostBuffer:
        return aligned_buffer(nbytes)

    def reserved(self, nbytes: int) -> int:
        return round_up(max(nbytes, 1), IO_ALIGN)

    def param_classes(self, groups: list[Group], itemsize: int, in_flight: int) -> dict[int, int]:
        classes = _schedule_classes(groups, itemsize, in_flight - 1, self.vocab_blocks)
        # the largest slot also takes an optimizer piece's compute copy (the initial write and a flat update
        # make it there), which a tiny model's layer slot may not hold once no slot is the embedding's
        piece = round_up(self.optimizer_piece(groups) * itemsize, IO_ALIGN)
        if not classes or max(classes) < piece:
            top = max(classes, default=0)
            if top:
                classes[top] -= 1
                classes = {b: c for b, c in classes.items() if c}
            classes[piece] = classes.get(piece, 0) + 1
        return classes

    def block_classes(self, groups: list[Group], itemsize: int) -> dict[int, int]:
        return {block_slot_bytes(groups, itemsize): BLOCK_SLOTS} if self.vocab_blocks else {}

    def optimizer_classes(self, groups: list[Group], copy_itemsize: int = 0) -> dict[int, int]:
        # per set in flight: master, exp_avg, exp_avg_sq of a piece; pipelined, also its compute copy, made in
        # a slot of its own rather than in the spent gradient, which the backward reuses while the write flies
        piece = self.optimizer_piece(groups)
        classes = {piece * 4: 3 * self.update_depth}
        if self.update_depth > 1 and copy_itemsize:
            classes[round_up(piece * copy_itemsize, IO_ALIGN)] = self.update_depth
        return classes

    # fp32 elements of a piece: half of what the aio engine has in flight (1 MiB blocks x queue depth 8, as aio()
    # makes), since the pipelined update keeps a read and writes in flight together (update_depth sets)
    PIECE_CAP = (1 << 20) * 8 // 4 // 2

    def optimizer_piece(self, groups: list[Group]) -> int:
        # The size class of the decoder layers (most of the model): the embedding and an untied head, often
        # several times larger, are streamed through the optimizer in pieces of that size rather than
        # sizing every slot for them; capped, since a piece is read whole before AdamW runs on it and a larger
        # piece is not read faster, it only holds more (0.1B's layer class is 7.1M elements, 27 MiB a slot,
        # against 4 MiB; at 0.1B, 1M-element pieces took the same step time as 2M ones, 41 MiB less peak RSS
        # with 3 sets in flight).
        layers = [g.numel for g in groups if g.name.startswith("layer.")] or [g.numel for g in groups]
        return min(round_up(max(layers), PIECE_ALIGN), self.PIECE_CAP)

    def swap_space(self, directory: Path, sizes: dict[str, int]) -> ExtentFile:
        return ExtentFile(directory, sizes, self.aio())

    def has_overflow(self, grads: torch.Tensor) -> bool:
        # One pass over the buffer in cache-sized chunks, stopping at the first non-finite value: the only
        # temporary is one chunk's bool mask (OVERFLOW_CHUNK bytes), never N.
        flat = grads.reshape(-1)
        for start in range(0, flat.numel(), OVERFLOW_CHUNK):
            if not bool(torch.isfinite(flat[start : start + OVERFLOW_CHUNK]).all()):
                return True
        return False

    def overflow_temp_bytes(self, n: int) -> int:
        return 8 * min(n, OVERFLOW_CHUNK) + 64  # isfinite on one chunk: an fp32 abs() copy, bool masks, scalars


def _schedule_classes(groups: list[Group], itemsize: int, window: int, blocked: bool = False) -> dict[int, int]:
    """Slot bytes -> count for the step's fetch schedule (executor.py: units embed .. head, then back down to
    layer 0: the embedding's backward fetches nothing), of which at most `window` consecutive units hold slots at once (the prefetcher's
    depth + 1). The i-th largest slot is the largest i-th largest group over every window, so whatever is in
    flight together has a slot at least its size: the embedding and an untied output layer, at the two ends
    of the schedule, share one slot, and only `window` layers' slots are kept."""
    tied = not any(name == "lm_head.weight" for name, _ in groups[-1].params)
    units = unit_groups(groups, tied)
    if blocked:  # the embedding and the head read their groups in blocks (vocab.py): no whole slot
        units = [[]] + units[1:-1] + [[]]
    schedule = units + units[-2:0:-1]
    sizes = [round_up(g.numel * itemsize, IO_ALIGN) for g in groups]
    slots: list[int] = []
    for at in range(max(len(schedule) - window + 1, 1)):
        held = sorted((sizes[gi] for unit in schedule[at : at + max(window, 1)] for gi in unit), reverse=True)
        slots = [max(a, b) for a, b in zip(slots, held)] + slots[len(held):] + held[len(slots):]
    return dict(Counter(slots))
