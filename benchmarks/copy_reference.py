"""What a host copy of a given size reaches here when the CPU's caches are cold: the ceiling for a swap of that size.

The host tier's reference in benchmarks/preemption.py is one 64 MiB memcpy, best of 5, the tier's bandwidth as the
issue names it. A swap in a serving run is smaller (a 0.5B turn's new tokens are 0.2-4 MB) and runs right after a
model step has streamed the weights through every cache level, and a cold copy of 1 MiB does not reach the 64 MiB
rate (the hardware prefetchers restart at each 4 KiB page and the copy ends before its stream is at full rate).
`cold_copy_seconds` measures that ceiling per size: a contiguous uint8 copy between warm pages (committed, as the
swap tier's region keeps them) after a buffer larger than the last-level cache has been written, as a model step
does. A swap's fraction of it says how much of what a copy of its size can do the swap does; its fraction of the
64 MiB memcpy says how far that is from the tier's bandwidth. (A merging swap-out, kv/swap_pairs.py, is recorded
with its new bytes only, as the tier counts it, while its seconds include copying the held history again, host to
host: its fraction is of the useful bytes, not of the bytes it moved.)

    rates = cold_copy_rates()                     # {bytes: bytes/s} at powers of two, 64 KiB .. 64 MiB
    seconds = cold_copy_seconds(1_179_648, rates)  # interpolated in log size
"""
from __future__ import annotations

import bisect
import math
import statistics
import time
from pathlib import Path

SIZES = tuple(1 << k for k in range(16, 27))  # 64 KiB .. 64 MiB


def llc_bytes() -> int:
    """The largest cache sysfs lists for CPU 0 (the last level), or 32 MiB where it lists none."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or 32 << 20


def cold_copy_rates(sizes: tuple[int, ...] = SIZES, reps: int = 5, flush_bytes: int | None = None) -> dict[int, float]:
    """Bytes/s of a contiguous copy of each size with cold caches: the median of `reps`, each after writing a
    buffer of `flush_bytes` (default twice the last-level cache, at least 256 MiB, at most 2 GiB)."""
    import torch

    if flush_bytes is None:
        flush_bytes = min(2 << 30, max(256 << 20, 2 * llc_bytes()))
    flush = torch.zeros(flush_bytes, dtype=torch.uint8)
    top = max(sizes)
    src, dst = torch.ones(top, dtype=torch.uint8), torch.zeros(top, dtype=torch.uint8)  # pages committed: warm
    rates = {}
    for n in sizes:
        times = []
        for _ in range(reps):
            flush.add_(1)  # every cache line of src and dst evicted, as after a model step
            t0 = time.perf_counter()
            dst[:n].copy_(src[:n])
            times.append(time.perf_counter() - t0)
        rates[n] = n / statistics.median(times)
    return rates


def cold_copy_seconds(nbytes: int, rates: dict[int, float]) -> float:
    """Seconds a cold copy of `nbytes` takes at `rates` (linear in log size between the measured sizes; the end
    rates beyond them)."""
    sizes = sorted(rates)
    if nbytes <= sizes[0]:
        return nbytes / rates[sizes[0]]
    if nbytes >= sizes[-1]:
        return nbytes / rates[sizes[-1]]
    i = bisect.bisect_left(sizes, nbytes)
    lo, hi = sizes[i - 1], sizes[i]
    w = (math.log(nbytes) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return nbytes / (rates[lo] + w * (rates[hi] - rates[lo]))
