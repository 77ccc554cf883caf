"""The SSD swap tier's write latency into a fresh preallocated file against one written with zeros at start
(`swap_ssd_prewrite`, memory/extent_store.py): ext4's fallocate leaves extents "unwritten", and the first write
into one converts it.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.ssd_first_write --dir /tmp --out benchmarks/results/ssd_first_write.json

Per repetition and kind (fresh, prewrite; alternating), a 64 MiB tier takes `--extents` writes of a ~150 KB
extent of 16 runs (the multi-turn benchmark's size) at increasing offsets (each a first write into the fresh
file), then the same writes again from offset 0 (rewrites). Reported: median, mean and p95 ms per write of each
pass, and their medians over the repetitions.
"""
from __future__ import annotations

import argparse
import shutil
import statistics as st
import sys
import tempfile
import time

import torch


def one(directory: str, prewrite: bool, extents: int, runs: list[torch.Tensor]) -> dict:
    from memfit.llm.kv.swap_ssd import SSDTier

    d = tempfile.mkdtemp(dir=directory, prefix="memfit-firstwrite-")
    tier = SSDTier(d, 64 << 20, threads=0, prewrite=prewrite)
    try:
        out: dict = {"direct": tier.store.direct}
        for name in ("first", "rewrite"):
            ms, placed = [], []
            for _ in range(extents):
                t0 = time.perf_counter()
                e = tier.write_runs(runs)
                ms.append((time.perf_counter() - t0) * 1e3)
                if e is None:
                    raise SystemExit("the 64 MiB tier is full: lower --extents")
                placed.append(e)
            for e in placed:  # freed: the next pass writes the same offsets again
                tier.free(e)
            ms.sort()
            out[name] = {"median_ms": st.median(ms), "mean_ms": st.mean(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))]}
        return out
    finally:
        tier.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--extents", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from benchmarks.common import emit, header, pin_threads

    pin_threads(1)
    g = torch.Generator().manual_seed(0)
    runs = [torch.randint(0, 256, (150_000 // 16,), dtype=torch.uint8, generator=g) for _ in range(16)]
    reps: dict[str, list[dict]] = {"fresh": [], "prewrite": []}
    for rep in range(a.reps):  # alternating: a busy spell of the shared machine hits both
        for kind in reps:
            print(f"[ssd_first_write] rep {rep + 1}/{a.reps}: {kind}", file=sys.stderr, flush=True)
            reps[kind].append(one(a.dir, kind == "prewrite", a.extents, runs))
    summary = {kind: {f"{p}_{m}": st.median(r[p][m] for r in rs) for p in ("first", "rewrite")
                      for m in ("median_ms", "mean_ms", "p95_ms")} for kind, rs in reps.items()}
    emit({**header(1, 0), "benchmark": "ssd_first_write", "dir": a.dir, "extent_bytes": 150_000 // 16 * 16,
          "summary": summary, "reps": reps}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
