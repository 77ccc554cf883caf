"""This core's multiply-add peak, measured (cpu_peak.cpp): the compute roof beside the bandwidth roof.

A decode step must read every weight once and do (batch x weights) multiply-adds. Which of the two bounds
it depends on the batch: on one Zen 4 core a bf16 weight is read at ~29 GB/s (14.5 G weights/s) and
multiplied at ~117 G MAC/s, so batch 8 sits right at the ridge, where both resources must run flat out at
once. benchmarks/decode_throughput.py reports both roofs per row.
"""
from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import torch

from memfit.llm.kernels.build import amx_allowed, load_cpu_linear, unavailable_reason

_LANES = {torch.float32: 16, torch.bfloat16: 32}  # multiply-adds per accumulator per instruction
_ACC = 24  # independent accumulators in the loop (cpu_peak.cpp)


def _loop(dtype: torch.dtype):
    """The C loop with its signature declared; RuntimeError where the kernels can't run `dtype` here."""
    if dtype not in _LANES:
        raise ValueError(f"peak is measured for float32 and bfloat16, not {dtype}")
    reason = unavailable_reason(dtype)
    lib = load_cpu_linear() if reason is None else None
    if lib is None:
        raise RuntimeError(f"memfit's CPU kernels are unavailable for {dtype}: {reason or 'the library failed to load'}")
    fn = lib.cdll.memfit_peak_macs
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_double
    return lambda iters, nthreads, a, b: fn(int(dtype == torch.bfloat16), iters, a, b, nthreads)


def run_peak_loop(dtype: torch.dtype, iters: int, nthreads: int = 1, a: float = 2.0 ** -8, b: float = 2.0 ** -8) -> float:
    """Run the loop once; returns the sum of its accumulators (iters x 24 x lanes x a x b per thread)."""
    return _loop(dtype)(iters, nthreads, a, b)


def peak_macs_per_s(dtype: torch.dtype, nthreads: int = 1, seconds: float = 0.2, reps: int = 5,
                    clock: Callable[[], float] = time.perf_counter) -> float | None:
    """Multiply-adds per second of `nthreads` cores on `dtype` (the best of `reps` runs of about `seconds`);
    None where the kernels can't run here. `clock`: wall time by default; `time.process_time` (one thread)
    counts only the time this process ran, so on a shared machine other jobs don't pull the peak down (at a
    load of 5 on 2 cores, wall time gave half of it)."""
    try:
        loop = _loop(dtype)  # resolved once: the timed runs below call only the C loop
    except (ValueError, RuntimeError):
        return None
    return _best_rate(lambda iters: loop(iters, nthreads, 2.0 ** -8, 2.0 ** -8), _ACC * _LANES[dtype] * nthreads,
                      1 << 16, seconds, reps, clock)


def _best_rate(run: Callable[[int], object], macs_per_iter: int, iters: int, seconds: float, reps: int,
               clock: Callable[[], float]) -> float:
    """Multiply-adds per second of `run(iters)`: `iters` grown 4x at a time until a run takes a quarter of
    `seconds`, scaled to about `seconds`, then the best of `reps` timed runs."""
    while True:  # calibrate: about `seconds` per run
        t = clock()
        run(iters)
        dt = clock() - t
        if dt >= seconds / 4 or iters >= 1 << 30:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    best = 0.0
    for _ in range(reps):
        t = clock()
        run(iters)
        best = max(best, iters * macs_per_iter / max(clock() - t, 1e-9))
    return best


def run_amx_peak_loop(iters: int) -> float | None:
    """cpu_amx.cpp's tile loop once: iters x 4 TDPBF16PS of 16 x 16 x 32 multiply-adds on 2^-8 x 2^-8 values;
    returns one accumulator element (iters x 32 x 2^-16), or None where this process can't run AMX."""
    reason = unavailable_reason(torch.bfloat16)
    lib = load_cpu_linear() if reason is None and amx_allowed() else None
    if lib is None:
        return None
    fn = lib.cdll.memfit_amx_peak
    fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_double
    r = fn(iters)
    return None if r < 0 else r


def amx_peak_macs_per_s(seconds: float = 0.2, reps: int = 5,
                        clock: Callable[[], float] = time.perf_counter) -> float | None:
    """bf16 multiply-adds per second of one core's AMX tile unit (the best of `reps` runs of about `seconds`);
    None without AMX. On a core that has it this, not the AVX-512 loop's, is the core's bf16 peak (here
    ~1.5 T against ~53 G: vdpbf16ps runs at half rate on this core)."""
    if run_amx_peak_loop(1) is None:
        return None
    return _best_rate(run_amx_peak_loop, 4 * 16 * 16 * 32, 1 << 12, seconds, reps, clock)
