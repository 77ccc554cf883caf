"""Which kernel runs a prefill step's many-row matmuls on memfit's packed weights, chosen at run time.

A BlockedLinear holds its weight once, in the blocked layout (blocked.py). From LARGE_M rows on, two kernels
read that layout in place:
- "avx512": cpu_blocked.cpp's many-row path (vdpbf16ps / FMA), the one decode steps run;
- "amx": cpu_amx.cpp, AMX tiles (bf16 only, K a multiple of 32, a CPU with AMX-BF16 that Linux lets this
  process use).
Where both can run, the first call of a weight shape (N, K, nb) inside a prefill step times both on that
call's own input (CPU time, alternating, the best of `TRIALS` each) and keeps the faster for the rest of the
process (`choices()` reports the times). benchmarks/prefill.py records them: on one Sapphire-Rapids-class core,
the 0.1b layer's shapes at 256-512 rows, AMX 282-345 G MAC/s against 46-51 for the AVX-512 kernel (298-378
against 48-51 in an earlier run), whose vdpbf16ps runs at half rate on this core.

The choice is per shape, not per row count: each kernel computes a row from that row alone, so one kernel for
every M >= LARGE_M keeps a row's bits independent of the call's rows (the MLP's row blocks, models/llama.py,
rely on it). The two kernels' bits differ (they add a pair's products in their own order), so only steps
that carry prefill rows may use the choice: the runner marks them with `prefill_step()`. Outside it (decode
steps however many rows, direct calls), BlockedLinear runs the AVX-512 kernel as before, and so do the decode
rows of a step that also carries prefill rows (`decode_rows`).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from memfit.llm.kernels.build import amx_allowed, load_cpu_linear, unavailable_reason

KERNELS = ("avx512", "amx")
TRIALS = 2  # timed runs of each kernel when choosing (alternating; the first call of a shape only)
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_in_prefill: contextvars.ContextVar[bool] = contextvars.ContextVar("memfit_prefill_step", default=False)
_decode_rows: contextvars.ContextVar[int] = contextvars.ContextVar("memfit_decode_rows", default=0)
_row0: contextvars.ContextVar[int] = contextvars.ContextVar("memfit_row0", default=0)  # the call's first step row


@dataclass
class Choice:
    """The kernel kept for one weight shape, and the CPU seconds each took on the call that chose it."""

    kernel: str
    rows: int  # rows of that call
    seconds: dict[str, float]


_choices: dict[tuple[int, int, int], Choice] = {}
_forced: str | None = None
_amx_fn: ctypes._CFuncPtr | None = None
_amx_checked = False


def amx_linear() -> ctypes._CFuncPtr | None:
    """cpu_amx.cpp's memfit_amx_linear_bf16, signature declared, or None where this process can't run AMX."""
    global _amx_fn, _amx_checked
    if not _amx_checked:
        _amx_checked = True
        lib = load_cpu_linear() if unavailable_reason(torch.bfloat16) is None and amx_allowed() else None
        if lib is not None:
            avail = lib.cdll.memfit_amx_available
            avail.restype = _I32
            if avail() == 1:
                fn = lib.cdll.memfit_amx_linear_bf16
                fn.argtypes = [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I32]
                fn.restype = _I32
                _amx_fn = fn
    return _amx_fn


def amx_scratch_bytes(rows: int, ks: Iterable[int], threads: int) -> int:
    """The most the AMX kernel allocates beside its output during one call of up to `rows` rows and any K in
    `ks` on `threads` threads (cpu_amx.cpp: per thread, x's row block packed into tiles and two column blocks'
    sums; freed when the call returns); 0 where this process can't run AMX. Only calls of LARGE_M rows or more
    in a prefill step reach it; the engine's ledger counts it in a step's activations (engine/accounting.py).
    One block a distinct K, not the largest alone: a freed block of a smaller K may stay a hole in the heap that
    the next call's larger block cannot reuse (a 160-row bf16 step of memfit-tiny peaked 99,328 B above a figure
    with the largest; its K=256 block was 110,592 B then, 131,072 B with two column blocks' sums,
    engine/arena_accounting.py)."""
    if amx_linear() is None:
        return 0
    fn = load_cpu_linear().cdll.memfit_amx_scratch_bytes
    fn.argtypes, fn.restype = [_I64, _I64], _I64
    return sum(fn(rows, k) for k in set(ks) if k % 32 == 0 and k > 0) * max(1, threads)


def candidates(dtype: torch.dtype, k: int) -> tuple[str, ...]:
    """The kernels that can run a (.., k) x (N, k) matmul of `dtype` here; "avx512" always first."""
    if dtype == torch.bfloat16 and k % 32 == 0 and k > 0 and amx_linear() is not None:
        return KERNELS
    return ("avx512",)


@contextlib.contextmanager
def prefill_step(enabled: bool = True, decode_rows: int = 0) -> Iterator[None]:
    """While active (in this thread or task), BlockedLinear calls of LARGE_M rows or more run the chosen
    kernel: the runner wraps the model call of a step that carries prefill rows in it. `decode_rows`: the
    step's first rows that are decode rows (the runner puts them first); they stay on the decode kernel, so
    a decode row has the same bits whether or not another sequence's prefill shares its step."""
    tokens = (_in_prefill.set(enabled), _decode_rows.set(decode_rows if enabled else 0), _row0.set(0))
    try:
        yield
    finally:
        for var, token in zip((_in_prefill, _decode_rows, _row0), tokens):
            var.reset(token)


@contextlib.contextmanager
def rows_from(row0: int) -> Iterator[None]:
    """Calls inside take rows from the step's row `row0` on (a block of the step's rows, models/llama.py's MLP),
    so `decode_rows` knows which of their rows are the step's decode rows."""
    token = _row0.set(row0)
    try:
        yield
    finally:
        _row0.reset(token)


def in_prefill_step() -> bool:
    return _in_prefill.get()


def decode_rows(m: int) -> int:
    """How many of a call's `m` rows, from its first, are decode rows of the prefill step it runs in."""
    return max(0, min(m, _decode_rows.get() - _row0.get()))


def force(kernel: str | None) -> str | None:
    """Use `kernel` for every shape where it can run (None: measure as usual; for benchmarks and tests that
    compare the kernels). Returns the previous setting."""
    global _forced
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    old, _forced = _forced, kernel
    return old


def choices() -> dict[tuple[int, int, int], Choice]:
    """(N, K, nb) -> the kernel kept for that shape in this process (a copy)."""
    return dict(_choices)


def reset() -> None:
    """Forget the choices (tests)."""
    _choices.clear()


def choose(key: tuple[int, int, int], rows: int, runs: dict[str, Callable[[], None]]) -> str:
    """The kernel for weight shape `key`: the kept choice, else the faster of `runs` (kernel -> a call that
    runs it once on this step's input) measured now and kept."""
    if _forced is not None and _forced in runs:
        return _forced
    kept = _choices.get(key)
    if kept is not None and kept.kernel in runs:
        return kept.kernel
    if len(runs) == 1:
        return next(iter(runs))
    best = {name: float("inf") for name in runs}
    for _ in range(TRIALS):
        for name, run in runs.items():
            t = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - t)
    kernel = min(best, key=lambda n: best[n])
    _choices[key] = Choice(kernel, rows, best)
    return kernel
