"""The tensor allocator's own count: the peak bytes it handed out within a block of code.

RSS says what the process holds, including allocator caches and freed-but-not-returned heap; saved-tensor
hooks see only what autograd keeps. Neither is "what this training step allocated". The allocator knows:
- CUDA: the caching allocator's counters (`memory_allocated`, `max_memory_allocated` after
  `reset_peak_memory_stats`);
- CPU: PyTorch's profiler records every allocation and free of the CPU allocator as a `[memory]` event
  (signed bytes, timestamped) when `profile_memory=True`; the running sum of those events, in time order, is
  the bytes allocated since the block began, and its maximum is the block's peak. Only the events are kept
  (no shapes, no stacks), but the profiler still costs time per operator: use it to measure, not always on.

    with AllocatorMeter() as m:
        train_step()
    m.peak_bytes   # most bytes allocated at once within the block, above what was allocated at its start
    m.net_bytes    # allocated at the end minus at the start

`memfit.train`'s meters (train local's probes, finetune's per-step report) put it beside RSS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


# libkineto (the profiler's C++ side) writes each message at or above KINETO_LOG_LEVEL straight to fd 2, past Python's
# logging: VERBOSE 0, INFO 1, WARNING 2, ERROR 3, STAGE 4 and, in torch 2.14's kineto, USDT 5, which prints
# 'USDT:... SyncActivityProfilerHandler.cpp:39] profiler_start' and '...:46] profiler_stop' around every metered
# block (in `memfit train finetune`'s stderr at level 5). Nothing it says there is the user's to act on: with no GPU
# it reports 'gpuGetDeviceCount failed' at ERROR; a profiler that cannot start raises in _enable_profiler, which
# still reaches the command. So the level sits above every severity, a margin left for ones added later.
KINETO_QUIET = "99"


@dataclass
class AllocatorPeak:
    peak_bytes: int  # max over the block of (allocated now - allocated at its start), >= 0
    net_bytes: int  # allocated at the end - allocated at the start (CPU: not below 0, see _peak_of)
    events: int  # allocator events seen (CPU) or 0 (CUDA: counters, no events)


class AllocatorMeter:
    """Peak bytes allocated by PyTorch's allocator on `device` within the `with` block (see the module doc)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.result: AllocatorPeak | None = None
        self._prof = None
        self._start = 0

    @property
    def peak_bytes(self) -> int:
        return self._result().peak_bytes

    @property
    def net_bytes(self) -> int:
        return self._result().net_bytes

    def _result(self) -> AllocatorPeak:
        if self.result is None:
            raise RuntimeError("AllocatorMeter has not measured a block yet")
        return self.result

    def __enter__(self) -> AllocatorMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        from torch._C._profiler import ProfilerActivity, RecordScope, _ExperimentalConfig
        from torch.autograd import ProfilerConfig, ProfilerState, _enable_profiler, _prepare_profiler

        os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)  # read once, when the profiler first starts
        # autograd's profiler, not its torch.profiler wrapper: the wrapper's start asks `hasattr(torch,
        # "_inductor")`, which imports torch._inductor and torch._dynamo, ~150 MiB of RSS in the measured process.
        # Operators are recorded only in the user scope (record_function blocks), not every op: the allocator's
        # events come through the profiler's memory hook either way, and a finetune step's op records took
        # tens of MiB of RSS in the process measured (0.1B: ~50 MiB at the metered step's peak).
        config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
        activities = {ProfilerActivity.CPU}
        _prepare_profiler(config, activities)
        _enable_profiler(config, activities, {RecordScope.USER_SCOPE})
        self._prof = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start
            net = torch.cuda.memory_allocated(self.device) - self._start
            self.result = AllocatorPeak(max(0, peak), net, 0)
            return
        from torch.autograd import _disable_profiler

        self._prof = None
        events = _disable_profiler().events()
        if exc[0] is None:  # a block that raised measured nothing worth reading
            self.result = _peak_of(events)


def _peak_of(recorded) -> AllocatorPeak:
    """The running sum of the CPU allocator's signed [memory] events, in time order, never below 0: a free of a
    block allocated before the block began is not the block's to credit. PyTorch drops such frees when it never
    saw the allocation, but its size table keeps entries from earlier profiled blocks, so a free at a reused
    address may still be reported (seen once in CI: 16 MB freed before a 1 MB allocation read as a peak of 0)."""
    events = sorted(((e.start_ns(), e.nbytes()) for e in recorded
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda ev: ev[0])  # stable: events at one timestamp keep the order they were recorded in
    now = peak = 0
    for _, nbytes in events:
        now = max(0, now + nbytes)
        peak = max(peak, now)
    return AllocatorPeak(peak, now, len(events))
