"""Cost of committing and releasing physical pages in memfit's virtual arena (the vAttention substrate).

vAttention maps physical pages into a reserved virtual range as requests grow; this prints what one commit
and one decommit cost on this device (CPU: 4 KiB pages via madvise; CUDA: 2 MiB pages via the driver's
cuMemCreate + cuMemMap + cuMemSetAccess), per page and per MiB, for several run lengths, and how long a
background prefault takes to drain (the overlapped path the engine uses).

    python -m benchmarks.vmem_commit --device auto --threads 1

Prints one JSON object (medians of --reps runs); --out also writes it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.common import emit, header, pin_threads
from memfit.memory.vmem import VirtualArena


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(device: torch.device, pages_per_run: list[int], reps: int) -> list[dict]:
    page = VirtualArena.page_size_for(device)
    rows = []
    for n in pages_per_run:
        arena = VirtualArena(n * page * 2, device=device, owner="bench")
        commit, decommit, prefault = [], [], []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            arena.commit(0, n * page)
            _sync(device)
            commit.append(time.perf_counter() - t)
            t = time.perf_counter()
            arena.decommit(0, n * page)
            _sync(device)
            decommit.append(time.perf_counter() - t)
            t = time.perf_counter()
            arena.prefault([(0, n * page)])  # background thread
            arena.drain()
            _sync(device)
            prefault.append(time.perf_counter() - t)
            arena.decommit(0, n * page)
        arena.close()
        mib = n * page / 2**20
        c, d, p = (statistics.median(x) for x in (commit, decommit, prefault))
        rows.append({"pages": n, "page_bytes": page, "commit_s": c, "decommit_s": d, "prefault_drain_s": p,
                     "commit_us_per_page": 1e6 * c / n, "decommit_us_per_page": 1e6 * d / n,
                     "commit_ms_per_gib": 1e3 * c / mib * 1024})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pages", nargs="+", type=int, default=None, help="run lengths in pages")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # Same byte sizes on both devices (2 MiB .. 512 MiB), expressed in that device's pages.
    page = VirtualArena.page_size_for(device)
    pages = args.pages or [max(1, (mib << 20) // page) for mib in (2, 32, 512)]
    result = {"benchmark": "vmem_commit", **header(args.threads, seed=None), "device": str(device),
              "reps": args.reps, "rows": bench(device, pages, args.reps)}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
