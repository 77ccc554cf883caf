"""The host swap tier's fixed costs with cold caches, as right after a model step (issue 15; docs/engine.md,
"A swap-out's fixed cost").

Before every timed call a buffer of `--flush-mib` (default 2 GiB, what a 0.5B fp32 step streams) is written, so the
interpreter's, torch's and numpy's code and data, and the copy's bytes, are out of the CPU's caches.
- `calls`: single calls the tier makes on a swap (a slice of the region, an `as_strided` view, a numpy count over a
  page-flag range, a (48, 24 KiB) strided torch copy against 48 `ctypes.memmove` calls and against the one C call
  that copies the rows now, kernels/copy_rows.py), cold and again at once (warm); medians.
- `swaps`: a reuse swap-out of `--new` tokens and the swap-in that follows, on the 0.5B shape's virtual cache with
  the engine's region, with a stacked chunk's rows copied through views and a torch copy (`views`) or by address
  (`address`, kv/swap.py BY_ADDRESS_MAX: in one C call; `address-memmove`, a memmove a row, as before it), taking
  turns each round; medians over `--rounds`, per held length T.

    OMP_NUM_THREADS=1 python -m benchmarks.swap_cold --out benchmarks/results/swap_cold.json
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time


def _cold(fn, flush, reps: int) -> tuple[float, float]:
    """(cold, warm) medians in microseconds: each rep writes the flush buffer, times `fn`, then times it again."""
    cold, warm = [], []
    for _ in range(reps):
        flush.add_(1)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        fn()
        cold.append(t1 - t0)
        warm.append(time.perf_counter() - t1)
    return statistics.median(cold) * 1e6, statistics.median(warm) * 1e6


def calls(flush, reps: int) -> dict:
    import numpy as np
    import torch

    from memfit.llm.kernels.copy_rows import copy_rows

    rows, row_bytes, stride = 48, 24 << 10, 400 << 10  # the 0.5B shape's 48 segments, 1024 tokens' rows apart
    region = torch.ones(64 << 20, dtype=torch.uint8)
    arena = torch.full((rows * stride,), 2, dtype=torch.uint8)
    flags = np.zeros(1 << 18, dtype=bool)
    src = arena.as_strided((rows, row_bytes), (stride, 1), 0)
    dst = region[: rows * row_bytes].view(rows, row_bytes)
    sp, dp = arena.data_ptr(), region.data_ptr()

    def memmove_rows() -> None:
        for i in range(rows):
            ctypes.memmove(dp + i * row_bytes, sp + i * stride, row_bytes)

    fns = {"torch_slice": lambda: region[4096 : 4096 + rows * row_bytes],
           "as_strided": lambda: arena.as_strided((rows, row_bytes), (stride, 1), 0),
           "np_count_nonzero": lambda: np.count_nonzero(flags[100:5000]),
           "strided_copy_48x24KiB": lambda: dst.copy_(src),
           "memmove_48x24KiB": memmove_rows,
           "copy_rows_48x24KiB": lambda: copy_rows(dp, row_bytes, sp, stride, rows, row_bytes)}
    out = {}
    for name, fn in fns.items():
        c, w = _cold(fn, flush, reps)
        out[name] = {"cold_us": c, "warm_us": w}
    return out


def swaps(flush, held: int, new: int, rounds: int) -> dict:
    from benchmarks.swap_tiers import _cache_and_swap, _write

    from memfit.llm.kernels.copy_rows import set_one_call

    room = held + (rounds + 1) * new + 16
    setups = {}
    modes = ("views", "address-memmove", "address")
    for mode in modes:
        layout, cache, swap = _cache_and_swap("0.5b", room + 64, reuse=True, region=True)
        swap.by_address = mode != "views"
        assert cache.try_allocate(1, room)
        _write(cache, layout, 1, 0, held)
        assert swap.try_swap_out(1, held)
        cache.free(1)
        assert cache.try_allocate(1, room) and swap.swap_in(1) == held
        setups[mode] = [layout, cache, swap, held]
    times: dict[str, dict[str, list[float]]] = {m: {"out": [], "in": []} for m in setups}
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            one_call = set_one_call(mode != "address-memmove")  # (a memmove a row: as before the one C call)
            layout, cache, swap, t = setups[mode]
            _write(cache, layout, 1, t, new)
            t += new
            flush.add_(1)
            t0 = time.perf_counter()
            assert swap.try_swap_out(1, t)
            times[mode]["out"].append(time.perf_counter() - t0)
            cache.free(1)
            assert cache.try_allocate(1, room)
            flush.add_(1)
            t0 = time.perf_counter()
            assert swap.swap_in(1) == t
            times[mode]["in"].append(time.perf_counter() - t0)
            setups[mode][3] = t
            set_one_call(one_call)
    for _, cache, swap, _ in setups.values():
        swap.close()
        cache.close()
    med = {m: {k: statistics.median(v) * 1e6 for k, v in d.items()} for m, d in times.items()}
    return {"held_tokens": held, "new_tokens": new, "rounds": rounds, "median_us": med,
            "address_over_views": {k: med["address"][k] / med["views"][k] for k in ("out", "in")},
            "address_over_memmove": {k: med["address"][k] / med["address-memmove"][k] for k in ("out", "in")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flush-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7, help="calls: cold/warm pairs per call")
    ap.add_argument("--held", type=int, nargs="+", default=[1024, 256], help="swaps: tokens held before the rounds")
    ap.add_argument("--new", type=int, nargs="+", default=[16, 64], help="swaps: new tokens a round (one per --held)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if len(a.new) != len(a.held):
        ap.error("--new takes one value per --held")
    from benchmarks.common import emit, header, pin_threads

    pin_threads(a.threads)
    import torch

    flush = torch.zeros(a.flush_mib << 20, dtype=torch.uint8)
    print("[swap_cold] calls ...", file=sys.stderr, flush=True)
    result = {**header(a.threads), "benchmark": "swap_cold", "flush_bytes": a.flush_mib << 20,
              "calls": calls(flush, a.reps), "swaps": []}
    for held, new in zip(a.held, a.new):
        print(f"[swap_cold] swaps, {held} held, {new} new ...", file=sys.stderr, flush=True)
        result["swaps"].append(swaps(flush, held, new, a.rounds))
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
