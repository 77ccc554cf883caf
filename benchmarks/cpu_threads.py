"""Why two-thread decode figures swing on this machine: a time series of what each core can do, alone and together.

Two-thread decode runs here read 36 GB/s in some blocks and 60 GB/s in others, and the slow decode cells sit
in the slow blocks (docs/benchmarks.md). This script separates the candidate causes. Each round measures,
back to back (threads pinned with sched_setaffinity; a peak is the best of 3 runs of ~0.15 s, a read or an
8-row figure the median of --reps passes):

- `peak_1t[c]`: core c's bf16 multiply-add peak alone (a register-only loop, memfit.llm.kernels.peak). If our
  two vCPUs shared one physical core (host SMT siblings), running both would halve each one's peak;
- `peak_2t`: both cores' peak together. About 2x `peak_1t` means two independent cores;
- `bw_1t[c]`, `bw_2t`: a sequential read of a 512 MiB buffer far past the caches, through memfit's blocked
  kernel as a 1-row product on huge pages (the decode stream itself, as the engine holds it), on core c
  alone, then on both;
- `gemm8_1t`, `gemm8_2t`: the same kernel on 8 rows (batch-8 decode, at the ridge on this core), as G MAC/s;
- `steal_ms`: host steal time of the round from /proc/stat (time the hypervisor ran someone else on our vCPUs).

Then, over the rounds: median / min / max of each figure, and the correlation of `bw_2t` with every other one.
Compute that stays put while `bw_2t` swings points at memory shared with other tenants on the host, not at
our cores being taken away.

    python -m benchmarks.cpu_threads --rounds 40 --out benchmarks/results/cpu_threads.json

Needs both cores and the AVX-512 bf16 kernels. Prints one JSON object; --out also writes a PNG beside it.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # both cores, before torch starts its pools

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import emit, header, median_time, pin_threads
from memfit.llm.kernels.blocked import can_use_blocked, pack_blocked
from memfit.llm.kernels.peak import peak_macs_per_s

K = 1024  # the streamed matrix is (N, K) bf16


def steal_ticks() -> int:
    """Host steal time so far, in clock ticks, summed over CPUs (the 8th field of /proc/stat's `cpu` line)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


class Kernels:
    """One bf16 (N, K) weight packed twice (one copy per thread count, so neither read hits the other's cache)."""

    def __init__(self, nbytes: int) -> None:
        n = nbytes // 2 // K
        lin = torch.nn.Linear(K, n, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        (self.one,) = pack_blocked([lin], nthreads=1)  # each in a huge-page arena, as the engine packs
        (self.two,) = pack_blocked([lin], nthreads=2)
        del lin
        self.nbytes, self.n = n * K * 2, n
        self.x1 = torch.ones(1, K, dtype=torch.bfloat16)
        self.x8 = torch.ones(8, K, dtype=torch.bfloat16)

    @torch.inference_mode()
    def bandwidth(self, threads: int, reps: int) -> float:
        lin = self.one if threads == 1 else self.two
        return self.nbytes / median_time(lambda: lin(self.x1), reps)

    @torch.inference_mode()
    def gemm8(self, threads: int, reps: int) -> float:
        lin = self.one if threads == 1 else self.two
        return 8 * self.n * K / median_time(lambda: lin(self.x8), reps)


def pearson(a: list[float], b: list[float]) -> float | None:
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:  # constant series
        return None


def one_round(k: Kernels, cores: list[int], reps: int) -> dict:
    bf16 = torch.bfloat16
    row: dict = {"t": time.time()}
    steal0 = steal_ticks()
    for c in cores:
        os.sched_setaffinity(0, {c})  # the 1-thread kernels run on the calling thread
        row[f"peak_1t_cpu{c}"] = peak_macs_per_s(bf16, 1, seconds=0.15, reps=3)
        row[f"bw_1t_cpu{c}"] = k.bandwidth(1, reps)
    row["gemm8_1t"] = k.gemm8(1, reps)
    os.sched_setaffinity(0, set(cores))
    row["peak_2t"] = peak_macs_per_s(bf16, 2, seconds=0.15, reps=3)
    row["bw_2t"] = k.bandwidth(2, reps)
    row["gemm8_2t"] = k.gemm8(2, reps)
    row["steal_ms"] = (steal_ticks() - steal0) * 1000 / os.sysconf("SC_CLK_TCK")
    return row


def summarise(rounds: list[dict]) -> dict:
    keys = [k for k in rounds[0] if k != "t"]
    out = {}
    for key in keys:
        vals = [r[key] for r in rounds]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                    "corr_with_bw_2t": pearson([r["bw_2t"] for r in rounds], vals) if key != "bw_2t" else 1.0}
    peak1 = [min(v for k, v in r.items() if k.startswith("peak_1t")) for r in rounds]
    out["peak_2t_over_peak_1t"] = statistics.median([r["peak_2t"] / p for r, p in zip(rounds, peak1)])
    out["gemm8_2t_over_1t"] = statistics.median([r["gemm8_2t"] / r["gemm8_1t"] for r in rounds])
    out["bw_2t_over_1t"] = statistics.median(
        [r["bw_2t"] / min(v for k, v in r.items() if k.startswith("bw_1t")) for r in rounds])
    return out


def plot(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rounds[0]["t"]
    ts = [r["t"] - t0 for r in rounds]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key in (k for k in rounds[0] if k.startswith("bw_")):
        ax1.plot(ts, [r[key] / 1e9 for r in rounds], marker=".", label=key)
    ax1.set_ylabel("read GB/s")
    ax1.legend(fontsize=8)
    for key in (k for k in rounds[0] if k.startswith(("peak_", "gemm8_"))):
        ax2.plot(ts, [r[key] / 1e9 for r in rounds], marker=".", label=key)
    ax2.set_ylabel("bf16 G MAC/s")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=8)
    fig.suptitle("Each core alone and both together, round by round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5, help="timed reads per bandwidth / 8-row figure (median)")
    ap.add_argument("--mib", type=int, default=512, help="size of the streamed matrix")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.reps < 1 or args.mib < 64:
        ap.error("--rounds >= 2, --reps >= 1 and --mib >= 64")
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        print(json.dumps({"error": "needs two CPUs; this process may use only " + str(cores)}))
        return 2
    if not can_use_blocked(torch.bfloat16) or peak_macs_per_s(torch.bfloat16, 1, 0.01, 1) is None:
        print(json.dumps({"error": "memfit's AVX-512 bf16 kernels can't run on this CPU"}))
        return 2
    pin_threads(1)  # the 1-thread figures on the calling thread; the 2-thread kernels bring their own count
    k = Kernels(args.mib << 20)
    from rich.progress import track

    rounds = [one_round(k, cores, args.reps) for _ in track(range(args.rounds), description="rounds", transient=True)]
    result = {"benchmark": "cpu_threads", "machine": header(2), "cores": cores, "streamed_bytes": k.nbytes,
              "rounds": args.rounds, "reps": args.reps, "summary": summarise(rounds), "series": rounds,
              "wall_seconds": rounds[-1]["t"] - rounds[0]["t"]}
    emit(result, args.out, lambda r, png: plot(r["series"], png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
