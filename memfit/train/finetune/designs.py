"""The two host-memory designs of an offloaded trainer, behind one interface (design_base.py), and the
registry `--host-memory` picks from: ZeRO-Infinity's (design_zero_infinity.py) and MemAscend's
(design_memascend.py).

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

from memfit.train.finetune.design_base import PIECE_ALIGN, HostMemoryDesign
from memfit.train.finetune.design_memascend import OVERFLOW_CHUNK, MemAscend
from memfit.train.finetune.design_zero_infinity import (ZeroInfinity, ZeroInfinityPipelined, ZeroInfinityTuned,
                                                         sub_groups)

__all__ = ["DESIGNS", "OVERFLOW_CHUNK", "PIECE_ALIGN", "HostMemoryDesign", "MemAscend", "ZeroInfinity",
           "ZeroInfinityPipelined", "ZeroInfinityTuned", "make_design", "sub_groups"]

DESIGNS = ("zero-infinity", "zero-infinity-tuned", "zero-infinity-pipelined", "memascend")


def make_design(name: str) -> HostMemoryDesign:
    if name == "zero-infinity":
        return ZeroInfinity()
    if name == "zero-infinity-tuned":
        return ZeroInfinityTuned()
    if name == "zero-infinity-pipelined":
        return ZeroInfinityPipelined()
    if name == "memascend":
        return MemAscend()
    raise ValueError(f"unknown --host-memory {name!r}; choose {', '.join(DESIGNS)}")
