"""The two host-memory designs of an offloaded trainer, behind one interface.

Everything else (the layer-wise executor, the tiers, AdamW, the data, the checkpoints) is shared, so a run
with `--host-memory zero-infinity` and one with `--host-memory memascend` differ in these policies only:

| policy | zero-infinity (DeepSpeed defaults) | memascend |
|---|---|---|
| parameter swap pool | 5 slots, each max(1e8 elements, largest group) | size classes of the group shapes, as many slots of each as the fetch schedule has in flight at once |
| 16-bit parameters in host memory | a flat copy of all of them while the model has at most 1e9 (`max_in_cpu`): read from there, never from the SSD | none: streamed from the SSD through the pool |
| optimizer swap pool | 4 slots, each the largest sub-group (fp32; sub-groups of up to 1e9 elements: the whole model below that) | 3 slots (master, m, v) of the layer size class, at most the aio engine's 8 MiB in flight; larger groups streamed in pieces of it |
| host allocations (states, gradients) | `pin_memory()`: CachingHostAllocator, rounded to a power of two on CUDA | `posix_memalign` exact size (+ `cudaHostRegister` on CUDA) |
| first optimizer step (SSD) | both moments of the largest sub-group in fresh zeroed memory | from the pool, as every step |
| overflow check (fp16 only) | `isinf(g).any()`, `isnan(g).any()` over the flat gradient buffer (N-byte temporaries) | one pass in fixed-size chunks (no N-sized temporary) |
| SSD layout | one file per tensor, created by its first write | one file, extents preallocated once |
| fp32 gradients (bf16/fp32 compute) | one flat buffer of the whole model, read by the optimizer after the backward | streamed: each group updated when its backward is done, its bytes reused (gradients.py); an untied embedding's and head's made a block of vocabulary rows at a time as the update reads them |

Both use the same aio engine (1 MiB blocks, queue depth 8, O_DIRECT where allowed) so the SSD comparison
is about layout, not request size. The DeepSpeed code each zero-infinity policy follows is cited beside it
(deepspeedai/DeepSpeed at edaa722; the sub-group, max_in_cpu and first-step policies from the 0.19.8 release,
whose buffers benchmarks/finetune_deepspeed.py --breakdown measures).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from memfit.memory.aio import AioEngine, ExtentFile, FilePerKey
from memfit.memory.hostpool import IO_ALIGN, HostBuffer, SlotPool, aligned_buffer, caching_pinned_buffer, next_pow2
from memfit.memory.mapping import round_up
from memfit.train.finetune.units import Group, unit_groups
from memfit.train.finetune.vocab import BLOCK_SLOTS, block_slot_bytes

DESIGNS = ("zero-infinity", "zero-infinity-tuned", "memascend")
PIECE_ALIGN = 4096  # elements: a piece of any dtype (>= 1 byte) starts on an O_DIRECT boundary
OVERFLOW_CHUNK = 1 << 16  # elements per pass of the fused check: temporaries of ~7 bytes each, L2-resident


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

    def optimizer_classes(self, groups: list[Group]) -> dict[int, int]:
        """The optimizer swap pool (fp32 master and moments): slot bytes -> slot count."""
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

    def optimizer_pool(self, groups: list[Group]) -> SlotPool:
        return SlotPool("optimizer swap pool", self.optimizer_classes(groups), aligned_buffer)

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


class ZeroInfinity(HostMemoryDesign):
    """DeepSpeed ZeRO-Infinity's host-memory policies with its default configuration."""

    name = "zero-infinity"
    # deepspeed/runtime/zero/offload_config.py: DeepSpeedZeroOffloadParamConfig buffer_count=5, buffer_size=1e8;
    # DeepSpeedZeroOffloadOptimizerConfig buffer_count=4.
    PARAM_BUFFER_COUNT = 5
    PARAM_BUFFER_SIZE = int(1e8)  # elements
    PARAM_MAX_IN_CPU = int(1e9)  # offload_config.py: DeepSpeedZeroOffloadParamConfig max_in_cpu=1e9 (elements)
    OPTIMIZER_BUFFER_COUNT = 4
    SUB_GROUP_SIZE = int(1e9)  # deepspeed/runtime/zero/config.py: DeepSpeedZeroConfig sub_group_size=1e9
    # deepspeed/ops/adam/cpu_adam.py (DeepSpeedCPUAdam.step): the state is created lazily, `exp_avg` and
    # `exp_avg_sq` = torch.zeros_like(p.data, dtype=float32) with p the whole sub-group's fp32 partition
    # (stage3.py _optimizer_step), in ordinary memory, on the first step; swapped out through the pool after.
    fresh_first_moments = True

    def host_buffer(self, nbytes: int) -> HostBuffer:
        # deepspeed/runtime/zero/stage3.py (_create_fp16_partitions / the flat gradient buffer):
        # `get_accelerator().pin_memory(torch.zeros(...))`, i.e. torch's CachingHostAllocator on CUDA, which
        # rounds each block up to a power of two. On a CPU accelerator nothing is pinned (no rounding).
        return caching_pinned_buffer(nbytes)

    def reserved(self, nbytes: int) -> int:
        return next_pow2(nbytes) if torch.cuda.is_available() else nbytes

    def param_classes(self, groups: list[Group], itemsize: int, in_flight: int) -> dict[int, int]:
        # deepspeed/runtime/swap_tensor/partitioned_param_swapper.py (_configure_aio): one tensor of
        # buffer_count x aligned(buffer_size) elements, every slot max-size whatever it will hold. DeepSpeed
        # asserts a parameter fits a slot; we grow the slot to the largest group instead of failing.
        largest = max(g.numel for g in groups)
        slot = round_up(max(self.PARAM_BUFFER_SIZE, largest) * itemsize, IO_ALIGN)
        return {slot: max(self.PARAM_BUFFER_COUNT, in_flight)}

    def host_param_copy(self, groups: list[Group]) -> bool:
        # deepspeed/runtime/zero/stage3.py (0.19.8): with offload_param to nvme, _create_param_groups_fp16_flat_
        # cpu_memory allocates a flat 16-bit buffer of min(parameters, max_in_cpu) elements, and
        # _create_fp16_partitions_with_defragmentation / _move_to_flat_buffer swap every sub-group that fits
        # in it "permanently to CPU" (final_location 'not-nvme'): the forward and backward read them there,
        # and the optimizer step copies the updated fp32 into them (_partitioned_params_swap_out, status
        # AVAILABLE) instead of writing them to NVMe. At the defaults every sub-group fits while the model
        # has at most 1e9 parameters. (Above that the first sub-group, >= sub_group_size, no longer fits and
        # DeepSpeed streams from NVMe through a partitioned swap buffer: not modelled here.)
        return sum(g.numel for g in groups) <= self.PARAM_MAX_IN_CPU

    def optimizer_classes(self, groups: list[Group]) -> dict[int, int]:
        # deepspeed/runtime/swap_tensor/optimizer_utils.py (OptimizerSwapper.__init__): SwapBufferManager(
        # num_elems=largest_numel, count=buffer_count): 4 fp32 slots, each the largest sub-group (stage3.py
        # _configure_tensor_swapping: largest_numel=max(fp16_partitioned_groups_flat_numel)), zeroed.
        return {self.optimizer_piece(groups) * 4: self.OPTIMIZER_BUFFER_COUNT}

    def optimizer_piece(self, groups: list[Group]) -> int:
        # DeepSpeed swaps a whole sub-group (master, moments and gradient) at once into slots sized for the
        # largest one, so every slot is that size; we swap our groups one by one into those slots.
        return round_up(max(sub_groups(groups, self.SUB_GROUP_SIZE)), PIECE_ALIGN)

    def swap_space(self, directory: Path, sizes: dict[str, int]) -> FilePerKey:
        # partitioned_param_swapper.py (_get_swap_paths) and optimizer_utils.py (FlattenedTensorSwapInfo):
        # `{id}_param.tensor.swp`, `{id}.tensor.swp`: one file per swapped tensor.
        return FilePerKey(directory, sizes, self.aio())

    def has_overflow(self, grads: torch.Tensor) -> bool:
        # deepspeed/runtime/zero/stage3.py (has_overflow, offloaded gradients): isinf(flat).any() and
        # isnan(flat).any() over the whole flat gradient buffer: each materialises an N-byte bool tensor.
        return bool(torch.isinf(grads).any()) or bool(torch.isnan(grads).any())

    def overflow_temp_bytes(self, n: int) -> int:
        return 5 * n + 64  # torch's isinf on CPU: an fp32 abs() copy (4n), the bool result (n), scalars


class ZeroInfinityTuned(ZeroInfinity):
    """ZeRO-Infinity with its buffer settings tuned for host memory, kept beside the defaults:
    - `sub_group_size` at its smallest: every parameter closes its own sub-group, so the 4 optimizer slots and the
      first step's fresh moments are sized for the largest parameter instead of the whole model (DeepSpeed's docs
      give sub_group_size as the knob for fitting large models);
    - `offload_param.buffer_size` at the largest parameter, the least DeepSpeed accepts (it asserts a parameter
      fits a buffer): the 5 parameter buffers hold that instead of 1e8 elements each (review: at 0.1B 235 MiB
      instead of 954; at 0.5B the tied embedding is larger than 1e8 anyway).
    `max_in_cpu` stays at its default: below it DeepSpeed reads every sub-group from the flat host copy; above
    it, it streams from NVMe through a partitioned swap buffer whose policy this model does not reproduce (see
    host_param_copy), so a tuned `max_in_cpu` is not offered rather than guessed."""

    name = "zero-infinity-tuned"
    SUB_GROUP_SIZE = 1
    PARAM_BUFFER_SIZE = 1  # elements: param_classes grows a slot to the largest group, so the slot is exactly that


class MemAscend(HostMemoryDesign):
    """MemAscend's policies (Liaw and Chen, arXiv 2505.23254): adaptive size-class pools, exact aligned
    allocation, a fused overflow check, preallocated SSD extents."""

    name = "memascend"
    stream_gradients = True
    blockwise_gradients = True
    vocab_blocks = True

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

    def optimizer_classes(self, groups: list[Group]) -> dict[int, int]:
        return {self.optimizer_piece(groups) * 4: 3}  # master, exp_avg, exp_avg_sq of the piece in hand

    # fp32 elements the aio engine has in flight for one tensor (1 MiB blocks x queue depth 8, as aio() makes)
    PIECE_CAP = (1 << 20) * 8 // 4

    def optimizer_piece(self, groups: list[Group]) -> int:
        # The size class of the decoder layers (most of the model): the embedding and an untied head, often
        # several times larger, are streamed through the optimizer in pieces of that size rather than
        # sizing every slot for them; at most what the aio engine keeps in flight for a tensor, since a
        # piece is read whole before AdamW runs on it (a larger piece is not read faster, it only holds
        # more: 0.1B's layer class is 7.1M elements, 27 MiB a slot, against 8 MiB).
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


def sub_groups(groups: list[Group], sub_group_size: int) -> list[int]:
    """Elements of each of ZeRO-3's optimizer sub-groups over the model's parameters in order (one param
    group): stage3.py `_create_fp16_sub_groups` closes a sub-group at the first parameter that brings it to
    at least `sub_group_size` elements, and keeps the whole group as one when it has no more than that."""
    sizes = [math.prod(shape) for g in groups for _, shape in g.params]
    if sum(sizes) <= sub_group_size:
        return [sum(sizes)]
    out, cur = [], 0
    for n in sizes:
        cur += n
        if cur >= sub_group_size:
            out.append(cur)
            cur = 0
    return out + ([cur] if cur else [])


def make_design(name: str) -> HostMemoryDesign:
    if name == "zero-infinity":
        return ZeroInfinity()
    if name == "zero-infinity-tuned":
        return ZeroInfinityTuned()
    if name == "memascend":
        return MemAscend()
    raise ValueError(f"unknown --host-memory {name!r}; choose {', '.join(DESIGNS)}")
