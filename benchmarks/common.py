"""What every benchmark shares: timing, thread pinning, the result header, and writing results.

- Timing: `time_calls` (seconds per call of every timed repetition), `median_time` (their median),
  `cpu_us` (process CPU time, microseconds: robust to other jobs on a shared machine) and `interleave`
  (several variants timed round by round, so a load change on the machine hits them all alike).
- Threads: `preset_threads` sets OMP_NUM_THREADS from the command line before torch starts its pools;
  `pin_threads` sets torch's intra-op threads (and OMP_NUM_THREADS for child processes, unless set).
- `header` is what every result JSON states so its figures can be compared: machine, versions, threads, seed.
- `emit` prints the one JSON object on stdout and, with `--out PATH`, writes it there and draws the PNG of
  the same stem beside it.

This module does not import torch at import time: a script may need to set OMP_NUM_THREADS first.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Clock = Callable[[], float]


# ---- timing ------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], reps: int, *, warmup: int = 1, inner: int = 1,
               clock: Clock = time.perf_counter, sync: Callable[[], Any] | None = None) -> list[float]:
    """Seconds per call of `fn` for each of `reps` timed repetitions, after `warmup` untimed calls.

    A repetition runs `fn` `inner` times back to back and records the mean (for calls too short to time one
    by one). `sync` (e.g. torch.cuda.synchronize) runs after the warm-up and around every repetition, so
    queued device work is inside the repetition that queued it. `clock` is time.perf_counter (wall) or
    time.process_time (CPU time of this process: what other jobs on the machine do not add to)."""
    if reps < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"reps and inner must be >= 1 and warmup >= 0 (got {reps}, {inner}, {warmup})")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(reps):
        if sync is not None:
            sync()
        t = clock()
        for _ in range(inner):
            fn()
        if sync is not None:
            sync()
        times.append((clock() - t) / inner)
    return times


def median_time(fn: Callable[[], Any], reps: int, **kw: Any) -> float:
    """Median seconds per call of `fn` over `reps` repetitions (keywords as `time_calls`; one warm-up call)."""
    return statistics.median(time_calls(fn, reps, **kw))


def cpu_us(fn: Callable[[], Any], reps: int, inner: int) -> float:
    """Median process CPU time per call in microseconds, to 0.1 us: 3 warm-up calls, then `reps` repetitions
    of `inner` calls each. CPU time, not wall time, so another job on a shared machine does not inflate it."""
    return round(median_time(fn, reps, warmup=3, inner=inner, clock=time.process_time) * 1e6, 1)


def interleave(fns: Mapping[str, Callable[[], Any]], reps: int, *, warmup: int = 1,
               clock: Clock = time.perf_counter, sync: Callable[[], Any] | None = None,
               on_round: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Seconds of one call of each variant, round by round: `warmup` untimed rounds, then `reps` timed ones,
    each round calling every variant once in order. Side by side like this, a load change on a shared
    machine hits every variant alike, so their ratios stay meaningful. `on_round` runs after each timed
    round (a progress bar)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(warmup + reps):
        for name, fn in fns.items():
            t = time_calls(fn, 1, warmup=0, clock=clock, sync=sync)[0]
            if rnd >= warmup:
                times[name].append(t)
        if rnd >= warmup and on_round is not None:
            on_round()
    return times


def device_seconds(fns: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, float] | None:
    """Median GPU kernel time of one call of each variant, from the profiler's kernel records (CUDA only): what
    the device spent, without the host's launch overhead, which wall time on a fast GPU mostly measures.
    Variants take turns, one profiled call each per round. None where the profiler reports no kernel times."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA]
            if not kernels:
                return None
            out[name].append(sum(e.device_time_total for e in kernels) / 1e6)  # kernels, copies, memsets: us -> s
    return {name: statistics.median(ts) for name, ts in out.items()}


def cuda_sync() -> Callable[[], Any] | None:
    """torch.cuda.synchronize where CUDA is available, else None (nothing to wait for)."""
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else None


# ---- threads -----------------------------------------------------------------------------------------------
def threads_in_argv(argv: Sequence[str], default: int = 1) -> int:
    """The value of `--threads N` / `--threads=N` in argv (`default` without one, or when it is not a number:
    argparse reports that later)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return default
    return default


def preset_threads(argv: Sequence[str] | None = None, default: int = 1) -> int:
    """Set OMP_NUM_THREADS from argv's --threads; call before torch is imported, because OpenMP and oneDNN
    size their pools when they start. Returns the thread count."""
    n = threads_in_argv(sys.argv if argv is None else argv, default)
    os.environ["OMP_NUM_THREADS"] = str(max(1, n))
    return n


def pin_threads(threads: int) -> None:
    """Run torch's intra-op work on `threads` threads; child processes get OMP_NUM_THREADS (unless set)."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {threads})")
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


# ---- results -----------------------------------------------------------------------------------------------
def header(threads: int, seed: int | Sequence[int] | None = None, **extra: object) -> dict:
    """Machine, versions, threads and seed: what every result JSON states (memfit.memory.measure)."""
    from memfit.memory.measure import machine_info

    return machine_info(threads, seed, **extra)  # type: ignore[arg-type]


def emit(result: dict, out: str | Path | None = None, draw: Callable[[dict, Path], Any] | None = None,
         indent: int = 2) -> str:
    """Print `result` as one JSON object on stdout; with `out`, also write it there (folders made) and, with
    `draw`, call draw(result, PNG path) for the PNG of the same stem beside it. Returns the JSON text.
    Printed first, so a failing write or plot loses nothing."""
    text = json.dumps(result, indent=indent)
    print(text, flush=True)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        if draw is not None:
            draw(result, png_beside(path))
    return text


def png_beside(json_path: str | Path, plot: str | None = None) -> Path:
    """The PNG of a result: `<stem>.png` beside it, or `<stem>.<plot>.png` for a result's further plots."""
    path = Path(json_path)
    return path.with_name(path.stem + (f".{plot}" if plot else "") + ".png")


def paired_bootstrap(diffs: Sequence[float] | Any, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of paired per-item differences `diffs` (items, or items x seeds, whose rows
    are resampled together so every seed sees the same draw of items), resampling items with replacement. Shared by
    the benchmarks that compare two systems item by item (quant_vit's test images, costmodel_paired's kernels)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    rng = np.random.default_rng(seed)
    n = d.shape[0]
    per_item = d.mean(axis=1)  # the mean over seeds, item by item: resampling items keeps seeds paired
    means = np.empty(n_boot)
    for i in range(0, n_boot, 1000):  # in chunks, so 10k items x 10k draws need not sit in memory at once
        k = min(1000, n_boot - i)
        means[i:i + k] = per_item[rng.integers(0, n, size=(k, n))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
