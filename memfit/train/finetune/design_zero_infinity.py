"""ZeRO-Infinity's host-memory policies (DeepSpeed's defaults, and the same with its buffers tuned for host
memory), each beside the DeepSpeed code it follows (deepspeedai/DeepSpeed at edaa722; the sub-group,
max_in_cpu and first-step policies from the 0.19.8 release). designs.py has the comparison with MemAscend.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from memfit.memory.aio import FilePerKey
from memfit.memory.hostpool import IO_ALIGN, HostBuffer, caching_pinned_buffer, next_pow2
from memfit.memory.mapping import round_up
from memfit.train.finetune.design_base import PIECE_ALIGN, HostMemoryDesign
from memfit.train.finetune.units import Group


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

    def optimizer_classes(self, groups: list[Group], copy_itemsize: int = 0) -> dict[int, int]:
        # deepspeed/runtime/swap_tensor/optimizer_utils.py (OptimizerSwapper.__init__): SwapBufferManager(
        # num_elems=largest_numel, count=buffer_count): 4 fp32 slots, each the largest sub-group (stage3.py
        # _configure_tensor_swapping: largest_numel=max(fp16_partitioned_groups_flat_numel)), zeroed.
        piece = self.optimizer_piece(groups)
        classes = {piece * 4: max(self.OPTIMIZER_BUFFER_COUNT, 3 * self.update_depth)}
        if self.update_depth > 1 and copy_itemsize and not self.host_param_copy(groups):
            classes[round_up(piece * copy_itemsize, IO_ALIGN)] = self.update_depth  # pipelined: a copy slot a set
        return classes

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


class ZeroInfinityPipelined(ZeroInfinityTuned):
    """`zero-infinity-tuned` with DeepSpeed's `offload_optimizer.pipeline_read` and `pipeline_write` on: the
    optimizer step reads the next sub-group's state while it updates this one and writes the last ones back
    behind it (stage3.py's PipelinedOptimizerSwapper), the rival to time memascend's pipelined update against.
    Modelled with memfit's pipelined update (store_update.py, `update_depth` 3 sets of master and moments in
    flight, 9 slots of the largest sub-group); how many buffers DeepSpeed's own swapper holds is not modelled,
    so its memory is this model's. Same arithmetic, same bits as the tuned design."""

    name = "zero-infinity-pipelined"
    update_depth = 3


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
