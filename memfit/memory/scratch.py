"""ScratchArena: one preallocated region for a step's transient tensors, carved into named regions per step.

Why: a model step's intermediates (a prefill layer's projections, norms, attention output, MLP blocks) are
made and freed layer after layer. Left to the C heap they come from wherever malloc finds room, and a
prefill pass grew glibc's heap by 4.9 MiB for 3.2 MiB of tensors (benchmarks/speculative_memory_breakdown.py),
pages it keeps after the step. Here the caller lays a step out once, as named regions sized from the step's
rows (`begin({"qkv": nbytes, ...})`), and every layer writes its intermediates into those same bytes
(`take("qkv", shape, dtype)` -> a view), so what the step holds is the layout's size, known before it runs.

Memory: a `VirtualArena` (memory/vmem.py: anonymous mmap, 4 KiB pages, committed with MADV_POPULATE_WRITE)
of `capacity` bytes, checked against a budget of its own of that size: `begin` commits the pages the step's
layout needs, all or nothing, and when the step ends the pages above `keep_bytes` are given back (MADV_DONTNEED),
so between steps the arena holds at most `keep_bytes` (None: keep the high-water mark). Measured on memfit-large's
budgeted speculative workload (benchmarks/speculative_memory_breakdown.py): with the pages kept, the 2-3 MiB of a
second-turn prefill's layout stayed committed through every decode step and the workload's peak did not fall;
given back, a step costs about one page fault per 4 KiB of its layout (MADV_POPULATE_WRITE), small beside a
prefill pass but not nothing (~0.02 s of a 3.2 s batch of 32 x 128-token prompts on a Zen 4 core, timed by a /tmp A/B, not a committed benchmark). The engine's
arena keeps them (keep_bytes None) but fits each step (`fit_each_step`): a step begins by giving back the pages
above its own layout (a smaller step after a larger one holds its own layout only, and the runner gives the pages
back before a decode step that runs outside the arena: the peak is that of giving back after every step), while
consecutive steps of one size fault nothing in; the engine calls `trim()` once it
has been idle for `kv_reclaim_idle_s` (engine/step_arena.py): the decay an allocator applies to its free pages. The owner reserves the capacity in its ledger up front (the engine carves it out of its step
reservation), so a commit can never run past what the ledger holds.

The active step is a context variable: code deep in a model asks `take(...)` without being handed the arena,
and gets None where no step is active, a region it does not know, or a shape that does not fit, and then
allocates as usual. A view stays valid until the next `begin` reuses the bytes: nothing may keep one past its
step.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import torch

from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.mapping import round_up
from memfit.memory.vmem import VirtualArena

__all__ = ["ALIGN", "ScratchArena", "active", "take"]

ALIGN = 64  # each region starts on a cache line
_active: contextvars.ContextVar[ScratchArena | None] = contextvars.ContextVar("memfit_scratch", default=None)


class ScratchArena:
    """`capacity` bytes of address space, committed on demand up to the largest step laid out in it."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu", owner: str = "step_scratch",
                 keep_bytes: int | None = 0, fit_each_step: bool = False) -> None:
        self.capacity = round_up(max(int(capacity), 1), VirtualArena.page_size_for(device))
        self.keep_bytes = keep_bytes  # committed bytes kept between steps (None: all of the high-water mark)
        # With keep_bytes None: give back, as a step begins, the pages above its layout, so that between steps the
        # arena holds the last step's layout and during one exactly its own (what giving back after every step
        # holds during a step; steps of the same size then commit nothing)
        self.fit_each_step = fit_each_step
        self.budget = MemoryBudget(self.capacity, Tier.DEVICE, name=owner)
        self.arena = VirtualArena(self.capacity, device, budget=self.budget, owner=owner)
        self._base = self.arena.tensor()  # (capacity,) uint8, a view: touches nothing
        self._regions: dict[str, tuple[int, int]] = {}  # name -> (offset, bytes) of the current step
        self.steps = 0  # steps laid out
        self.overflows = 0  # steps whose layout exceeded the capacity (they ran on ordinary allocations)
        self.high_water_bytes = 0  # the largest layout a step used
        self._in_step = False  # inside step(): a second step of this arena is refused

    @staticmethod
    def layout_bytes(regions: Mapping[str, int]) -> int:
        """The bytes a layout of `regions` (name -> bytes) takes, each region ALIGN-aligned."""
        return sum(round_up(n, ALIGN) for n in regions.values())

    @property
    def committed_bytes(self) -> int:
        return self.arena.committed_bytes

    @contextlib.contextmanager
    def step(self, regions: Mapping[str, int]) -> Iterator[ScratchArena | None]:
        """Lay the step out as `regions` (name -> bytes), commit them, and make this arena the active one while
        the block runs (yields it; None, and nothing active, when the layout exceeds the capacity). A step of the
        same arena inside it is refused: it would re-lay the bytes under the outer pass's live views, and give
        its pages back under them when it ended."""
        if self._in_step:
            raise RuntimeError("ScratchArena.step: this arena's step is already running (a nested step would reuse "
                               "the outer pass's bytes under its live views)")
        ok = self.begin(regions)
        self._in_step = True
        token = _active.set(self if ok else None)
        try:
            yield self if ok else None
        finally:
            _active.reset(token)
            self._in_step = False
            self._regions = {}
            if self.keep_bytes is not None and self.committed_bytes > self.keep_bytes:
                self.trim(self.keep_bytes)

    def begin(self, regions: Mapping[str, int]) -> bool:
        """Lay out a new step; False (no regions) when it does not fit the capacity."""
        need = self.layout_bytes(regions)
        self._regions = {}
        self.steps += 1
        if need > self.capacity:
            self.overflows += 1
            return False
        if self.fit_each_step and self.committed_bytes > round_up(need, self.arena.page_size):
            self.trim(need)  # a smaller step than the last: its surplus goes before this step runs
        if need:
            self.arena.commit(0, need)  # idempotent: pages kept from an earlier step stay as they are
        off = 0
        for name, n in regions.items():
            self._regions[name] = (off, n)
            off += round_up(n, ALIGN)
        self.high_water_bytes = max(self.high_water_bytes, need)
        return True

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A contiguous `shape` tensor of `dtype` at the start of region `name`, or None when the step has no
        such region or it is too small. The bytes are whatever the last user left there."""
        region = self._regions.get(name)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if region is None or nbytes > region[1]:
            return None
        off = region[0]
        return self._base[off : off + nbytes].view(dtype).view(shape)

    def trim(self, keep_bytes: int = 0) -> int:
        """Give back the committed pages above `keep_bytes`; returns the bytes given back."""
        keep = round_up(max(0, keep_bytes), self.arena.page_size)
        if keep >= self.capacity:
            return 0
        return self.arena.decommit(keep, self.capacity - keep)

    def close(self) -> None:
        self._regions = {}
        self.arena.close()


def active() -> ScratchArena | None:
    """The arena of the step running in this thread or task, or None."""
    return _active.get()


def take(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """`ScratchArena.take` on the active step's arena; None when no step is active (allocate as usual)."""
    arena = _active.get()
    return None if arena is None else arena.take(name, shape, dtype)
