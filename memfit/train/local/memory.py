"""Measured training memory: bytes saved for backward (saved-tensor hooks) plus gradients alive.

`TrainingMemoryMeter` is a context manager. While it is active every tensor autograd saves for backward goes
through `pack`, which counts its storage once (unique storages: a tanh output that the next Linear saves
again is one buffer) and attaches a finaliser that un-counts it when autograd frees the graph. Parameters
saved for backward are not counted: their bytes are already in `param_bytes`. After every pack and every
gradient accumulation the meter samples `saved + gradients` and keeps the peak: that is the *training
overhead*, the part a learning rule changes. Weights and optimizer state are held by every rule and are
reported separately, so `peak_training_bytes = peak_overhead + params + optimizer state + projections`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Iterable

import psutil
import torch
from torch import nn


class _Saved:
    """What autograd keeps instead of the tensor while the meter is on; freeing it un-counts the storage."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is not None:
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    return unique_bytes(
        v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    )


@dataclass
class MemoryReport:
    peak_overhead_bytes: int  # max over time of (saved-for-backward + gradients alive)
    peak_saved_bytes: int  # max of saved-for-backward alone
    grad_bytes_at_peak: int  # gradients alive at the overhead peak
    param_bytes: int
    optimizer_state_bytes: int
    extra_state_bytes: int  # e.g. stored projection / feedback matrices of local rules
    peak_rss_bytes: int
    peak_training_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.peak_training_bytes = (
            self.peak_overhead_bytes + self.param_bytes + self.optimizer_state_bytes + self.extra_state_bytes
        )


class TrainingMemoryMeter:
    """Counts saved-for-backward storages and parameter gradients for `model` while active."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._param_keys = {storage_key(p) for p in self.params}
        self._live: dict[tuple[str, int], list[int]] = {}  # storage -> [nbytes, handles alive]
        self.saved_bytes = 0
        self.peak_overhead = 0
        self.peak_saved = 0
        self.grad_at_peak = 0
        self.peak_rss = psutil.Process().memory_info().rss
        self._hooks_ctx = None
        self._grad_handles: list = []

    # -- autograd hooks ------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key in self._param_keys:
            return t  # weights are counted once, in param_bytes
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [t.untyped_storage().nbytes(), 0]
            self.saved_bytes += entry[0]
        entry[1] += 1
        # keep a detached alias (same storage; autograd re-attaches grad_fn on unpack): holding t itself, a
        # saved *output* would close the cycle output -> grad_fn -> saved variable -> handle -> output, which
        # no gc can break when the graph is never backwarded (an RNN step whose loss weight is 0)
        handle = _Saved(t.detach())
        weakref.finalize(handle, self._release, key)
        self.sample()
        return handle

    @staticmethod
    def _unpack(handle):
        return handle.tensor if isinstance(handle, _Saved) else handle

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.saved_bytes -= entry[0]
            del self._live[key]

    # -- sampling ------------------------------------------------------------------------------------------
    def grad_bytes(self) -> int:
        return unique_bytes(p.grad for p in self.params if p.grad is not None)

    def sample(self, *_args) -> None:
        grads = self.grad_bytes()
        now = self.saved_bytes + grads
        self.peak_saved = max(self.peak_saved, self.saved_bytes)
        if now > self.peak_overhead:
            self.peak_overhead, self.grad_at_peak = now, grads

    def sample_rss(self) -> None:
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    def __enter__(self) -> "TrainingMemoryMeter":
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_ctx.__enter__()
        # a gradient that lands while saved tensors are still alive can set the peak: sample right then
        self._grad_handles = [p.register_post_accumulate_grad_hook(self.sample) for p in self.params]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        self._hooks_ctx.__exit__(*exc)
        self._hooks_ctx = None

    def report(self, optimizers: Iterable[torch.optim.Optimizer], extra_state_bytes: int = 0) -> MemoryReport:
        self.sample_rss()
        return MemoryReport(
            peak_overhead_bytes=self.peak_overhead,
            peak_saved_bytes=self.peak_saved,
            grad_bytes_at_peak=self.grad_at_peak,
            param_bytes=unique_bytes(self.params),
            optimizer_state_bytes=optimizer_state_bytes(optimizers),
            extra_state_bytes=extra_state_bytes,
            peak_rss_bytes=self.peak_rss,
        )
