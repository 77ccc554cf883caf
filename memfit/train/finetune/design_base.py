"""The interface of an offloaded trainer's host-memory design (designs.py compares the two designs): how it
allocates host memory, sizes its swap pools, lays out SSD swap space and checks gradients for overflow.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memfit.memory.aio import AioEngine, ExtentFile, FilePerKey
from memfit.memory.hostpool import HostBuffer, SlotPool, aligned_buffer
from memfit.train.finetune.units import Group

PIECE_ALIGN = 4096  # elements: a piece of any dtype (>= 1 byte) starts on an O_DIRECT boundary


class HostMemoryDesign:
    name = "base"
    # SSD tier: the first optimizer step takes Adam's moments from fresh zeroed memory of the largest
    # sub-group (2 x fp32) instead of the swap pool, as DeepSpeed's first step does (ZeroInfinity below)
    fresh_first_moments = False
    # fp32 gradients streamed group by group, each group updated as soon as the backward completes it
    # (gradients.py), instead of one whole-model buffer read by the optimizer after the backward
    stream_gradients = False
    # streamed only: an untied embedding's and head's gradients made a block of vocabulary rows at a time as
    # the update reads them (gradients.blockwise_groups), never whole
    blockwise_gradients = False
    # the embedding's forward and the head read their (V, C) matrix a block of rows at a time (vocab.py): the
    # parameter pool holds two block slots instead of a slot of the matrix; the head's log-sum-exp runs over
    # blocks (online softmax), so its losses equal the dense head's to rounding, not bit for bit
    vocab_blocks = False
    # SSD tier: sets of optimizer slots (a piece's master and moments, and its compute copy when it is
    # separate) the update keeps in flight (store_update.py). 1: read a piece, update it, write it back and wait,
    # then the next (DeepSpeed's default, pipeline_read/pipeline_write off). 3: the next piece is read and the
    # last one written while AdamW runs on this one, and a group's last writes finish during the backward of
    # the units after it (settled before the step ends).
    update_depth = 1

    def __init__(self) -> None:
        self.engine: AioEngine | None = None

    # -- allocations -------------------------------------------------------------------------------------
    def host_buffer(self, nbytes: int) -> HostBuffer:
        raise NotImplementedError

    def reserved(self, nbytes: int) -> int:
        """Bytes `host_buffer(nbytes)` really holds."""
        raise NotImplementedError

    def param_classes(self, groups: list[Group], itemsize: int, in_flight: int) -> dict[int, int]:
        """The parameter swap pool: slot bytes -> slot count."""
        raise NotImplementedError

    def optimizer_classes(self, groups: list[Group], copy_itemsize: int = 0) -> dict[int, int]:
        """The optimizer swap pool (fp32 master and moments; with update_depth > 1 also a compute-copy slot of
        `copy_itemsize` bytes an element per set, 0 when the compute dtype is fp32): slot bytes -> slot count."""
        raise NotImplementedError

    def optimizer_piece(self, groups: list[Group]) -> int:
        """Elements of a group the optimizer swaps in at once (a multiple of 4096)."""
        raise NotImplementedError

    def param_pool(self, groups: list[Group], itemsize: int, in_flight: int) -> SlotPool:
        return SlotPool("param swap pool", self.param_classes(groups, itemsize, in_flight), aligned_buffer)

    def block_classes(self, groups: list[Group], itemsize: int) -> dict[int, int]:
        """With vocab_blocks, the slots the (V, C) matrices are read into a block of rows at a time (their own
        pool: the prefetcher's layers never take them, nor they a layer's): slot bytes -> count."""
        return {}

    def host_param_copy(self, groups: list[Group]) -> bool:
        """Whether the compute-dtype parameters of an SSD-offloaded run stay whole in host memory (one flat
        copy, refreshed by the optimizer step) instead of being read from the SSD."""
        return False

    def optimizer_pool(self, groups: list[Group], copy_itemsize: int = 0) -> SlotPool:
        return SlotPool("optimizer swap pool", self.optimizer_classes(groups, copy_itemsize), aligned_buffer)

    def swap_space(self, directory: Path, sizes: dict[str, int]) -> ExtentFile | FilePerKey:
        raise NotImplementedError

    def aio(self) -> AioEngine:
        if self.engine is None:
            self.engine = AioEngine(block_size=1 << 20, queue_depth=8)
        return self.engine

    # -- overflow ---------------------------------------------------------------------------------------
    def has_overflow(self, grads: torch.Tensor) -> bool:
        raise NotImplementedError

    def overflow_temp_bytes(self, n: int) -> int:
        """Peak temporary bytes of `has_overflow` over n fp32 gradients (measured by the tests)."""
        raise NotImplementedError
