"""What a DeepSpeed ZeRO-3 run holds in host memory, pool by pool (benchmarks/finetune_deepspeed.py --breakdown).

Each buffer is reported twice: the bytes it spans (numel x itemsize) and the bytes of it resident now,
counted page by page with mincore(2) over its address range, so a `torch.empty` that was never written
counts nothing and a zeroed (page-locked in DeepSpeed's words) buffer counts in full. The buffers are
looked up by the attributes DeepSpeed 0.19.8 keeps them in:

- `param_groups_fp16_flat_cpu_memory` (stage3.py `_create_param_groups_fp16_flat_cpu_memory`): the 16-bit
  parameters, min(all, offload_param.max_in_cpu = 1e9) of them, moved "permanently to CPU";
- the parameter swapper's `buffers` (partitioned_param_swapper.py: buffer_count x aligned buffer_size) and
  its `partitioned_swap_buffer` when params live on NVMe;
- the optimizer swapper's `SwapBufferManager.all_buffers` (optimizer_utils.py: buffer_count slots of the
  largest sub-group, fp32, zeroed);
- `grad_partitions_flat_buffer` (fp32 gradients of every partition, zeroed);
- the IPG buckets (`reduce_bucket_size` elements on the accelerator, the host with DS_ACCELERATOR=cpu);
- parameters gathered on the accelerator after the forward (`ds_status` AVAILABLE);
- the autograd graph's saved tensors (torch.autograd.graph.saved_tensors_hooks, unique storages).
"""
from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable
from contextlib import contextmanager

import torch

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s storage in resident pages (mincore over the pages it spans)."""
    storage = t.untyped_storage()
    n = storage.nbytes()
    if n == 0 or t.device.type != "cpu":
        return 0
    start = storage.data_ptr() // PAGE * PAGE
    end = -(-(storage.data_ptr() + n) // PAGE) * PAGE
    pages = (end - start) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        return -1
    return sum(v & 1 for v in vec) * PAGE


def _pool(tensors: Iterable[torch.Tensor]) -> dict:
    seen, span, res = set(), 0, 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen or t.untyped_storage().nbytes() == 0:
            continue
        seen.add(key)
        span += t.untyped_storage().nbytes()
        res += resident_bytes(t)
    return {"span_bytes": span, "resident_bytes": res, "tensors": len(seen)}


def host_pools(engine, model: torch.nn.Module) -> dict[str, dict]:
    """DeepSpeed's host buffers of note, by the names above."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    opt = engine.optimizer
    params = list(model.parameters())
    swapper = getattr(params[0], "nvme_swapper", None)
    opt_swapper = getattr(opt, "optimizer_swapper", None)
    out = {
        "fp16 flat cpu copy (param_groups_fp16_flat_cpu_memory)": _pool(opt.param_groups_fp16_flat_cpu_memory),
        "param swap buffers (nvme_swapper.buffers)": _pool([getattr(swapper, "buffers", None)]),
        "param partitioned swap buffer": _pool([getattr(swapper, "partitioned_swap_buffer", None)]),
        "optimizer swap buffers (SwapBufferManager)": _pool(
            opt_swapper.swap_buffer_manager.all_buffers if opt_swapper is not None else []),
        "fp32 gradients (grad_partitions_flat_buffer)": _pool([opt.grad_partitions_flat_buffer]),
        "ipg buckets (reduce_bucket_size, on the accelerator)": _pool(
            [b.buffer for b in opt.ipg_buckets.values()]),
        "fp32 partitions held in memory": _pool(opt.fp32_partitioned_groups_flat),
        "optimizer state held in memory": _pool(
            t for s in opt.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
        "gathered params now (ds_status AVAILABLE)": _pool(
            p.data for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE),
    }
    return out


@contextmanager
def saved_tensor_meter(record: dict):
    """Sum the unique storages the autograd graph saves inside the block into record['saved_bytes']."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    record["saved_bytes"] = sum(seen.values())
    record["saved_storages"] = len(seen)


class PeakTracker:
    """The RSS peak inside chosen DeepSpeed methods, above the RSS when each was entered (the largest over
    calls), without losing the run's overall peak: VmHWM is read into every open frame and `overall` before
    each reset, so nested methods (the IPG flush inside the backward) keep their callers' peaks too."""

    def __init__(self) -> None:
        from memfit.memory.measure import peak_rss_bytes

        self.overall = peak_rss_bytes()
        self.transients: dict[str, int] = {}
        self._frames: list[list] = []  # [name, rss at entry, peak seen since]

    def _observe(self) -> None:
        from memfit.memory.measure import peak_rss_bytes

        peak = peak_rss_bytes()
        self.overall = max(self.overall, peak)
        for f in self._frames:
            f[2] = max(f[2], peak)

    def wrap(self, obj, names: list[str]) -> None:
        import functools

        from memfit.memory.measure import reset_peak_rss, rss_bytes

        for name in names:
            fn = getattr(obj, name, None)
            if fn is None:
                continue

            @functools.wraps(fn)
            def traced(*a, _fn=fn, _name=name, **kw):
                self._observe()
                reset_peak_rss()
                before = rss_bytes()
                self._frames.append([_name, before, before])
                try:
                    return _fn(*a, **kw)
                finally:
                    self._observe()
                    _, before, peak = self._frames.pop()
                    self.transients[_name] = max(self.transients.get(_name, 0), peak - before)

            setattr(obj, name, traced)

    def peak(self) -> int:
        self._observe()
        return self.overall
