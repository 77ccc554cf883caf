"""What oneDNN's caches keep per step size on the oneDNN linear path, and what bounds it (issue 16: memory that grew
over a multi-turn workload beside the KV), as one JSON object.

    python -m benchmarks.onednn_shape_cache --threads 1 --reps 3 --out benchmarks/results/onednn_shape_cache.json

Where memfit's blocked kernels do not run (a CPU without AVX-512, or --cpu-linear onednn), a packed linear is
`torch.ops.mkldnn._linear_pointwise` (models/packing.py). PyTorch's ideep keeps a compiled computation per input
shape (an LRU of LRU_CACHE_CAPACITY entries, default 1024) and oneDNN a primitive per shape (a cache of
ONEDNN_PRIMITIVE_CACHE_CAPACITY, default 1024), in the C heap, for the rest of the process. Each configuration runs
in a fresh process: memfit-tiny (float32, oneDNN linears, PyTorch ops), its whole model and head run at every row
count 1..64 (decode batches, prompt tails) and at the runner's padded prefill sizes 96..512, twice. Reported per
round: the C heap's bytes in use (glibc mallinfo2) and the RSS added, and the CPU seconds. Configurations:
- exact: every call at its own row count (memfit before row buckets), caches at their defaults;
- cap_N: exact rows, both caches capped at N entries (environment, set before the process's first oneDNN call);
- both_off: exact rows, no cache;
- buckets (the default now, packing.ROW_BUCKETS) and pow2 (1..64 by powers of two, blocks of 64): rows padded, and
  every bucket's kernel built first, as the engine does at load (packing.warm_row_buckets; reported as at_load).
The configurations alternate, `--reps` times; the JSON keeps every run and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import emit, header

EXACT = tuple(range(1, 4097))  # every row count its own shape: no padding, a single block for any step here
POW2 = (1, 2, 4, 8, 16, 32, 64)
CONFIGS = {
    "exact": ({}, "exact"),
    "cap_64": ({"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}, "exact"),
    "both_off": ({"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, "exact"),
    "buckets": ({}, "default"),
    "pow2": ({}, "pow2"),
}
PREFILL_ROWS = (96, 128, 160, 192, 224, 256, 320, 384, 448, 512)  # runner.bucket_tokens: multiples of 32


def worker(threads: int, max_rows: int, buckets: str) -> dict:
    import ctypes
    import gc

    import torch

    torch.set_num_threads(threads)
    from memfit.llm.engine.api import LLM
    from memfit.llm.kernels.attention import DenseCausalAttention
    from memfit.llm.models import packing
    from memfit.memory.measure import status_bytes

    if buckets != "default":
        packing.ROW_BUCKETS = EXACT if buckets == "exact" else POW2
    warm = packing.warm_row_buckets
    packing.warm_row_buckets = lambda model, rows: 0  # timed below, on its own

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)  # heap chunks in use + mmapped chunks

    # the engine's and server's step, as the committed results ran (LLM's own CPU default is 2048)
    eng = LLM(model="memfit-tiny", dtype="float32", cpu_linear="onednn", cpu_kernels=False,
              enable_prefix_caching=False, max_num_batched_tokens=512).engine
    model = eng.model
    sizes = list(range(1, max_rows + 1)) + list(PREFILL_ROWS)
    rounds = []
    gc.collect()
    before, rss, t0 = in_use(), status_bytes()["VmRSS"], time.process_time()
    if buckets != "exact":  # what the engine does at load: every bucket's kernel (none: exact sizes are unbounded)
        warm(model, max(sizes))
    gc.collect()
    at_load = {"heap_in_use_added_bytes": in_use() - before, "rss_added_bytes": status_bytes()["VmRSS"] - rss,
               "cpu_s": time.process_time() - t0}
    with torch.inference_mode():
        for _ in range(2):
            gc.collect()
            before, rss, t0 = in_use(), status_bytes()["VmRSS"], time.process_time()
            for m in sizes:
                h = model(torch.randint(0, 4000, (m,)), torch.arange(m), DenseCausalAttention([m], model.scale))
                model.compute_logits(h[-min(m, max_rows):])  # the head: one row a sequence (decode), at most 64
            gc.collect()
            rounds.append({"heap_in_use_added_bytes": in_use() - before,
                           "rss_added_bytes": status_bytes()["VmRSS"] - rss, "cpu_s": time.process_time() - t0})
    shown = "1..4096" if buckets == "exact" else ",".join(map(str, packing.ROW_BUCKETS))
    return {"backends": str(eng.backends), "row_buckets": shown, "at_load": at_load, "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=64, help="row counts 1..N (decode batches, prompt tails)")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of every configuration")
    ap.add_argument("--out")
    ap.add_argument("--worker", choices=["exact", "pow2", "default"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.threads, a.max_rows, a.worker)))
        return 0
    runs: dict[str, list] = {name: [] for name in CONFIGS}
    loads = []
    for _ in range(a.reps):
        for name, (env, buckets) in CONFIGS.items():
            loads.append(os.getloadavg()[0])
            out = subprocess.run([sys.executable, "-m", "benchmarks.onednn_shape_cache", "--worker", buckets,
                                  "--threads", str(a.threads), "--max-rows", str(a.max_rows)], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads), **env}, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, (env, buckets) in CONFIGS.items():
        keys = ("heap_in_use_added_bytes", "rss_added_bytes", "cpu_s")
        med = {f"{k}_round{i + 1}": statistics.median(r["rounds"][i][k] for r in runs[name])
               for i in range(2) for k in keys}
        med.update({f"{k}_at_load": statistics.median(r["at_load"][k] for r in runs[name]) for k in keys})
        rows.append({"config": name, "env": env, "rows": buckets, "medians": med, "runs": runs[name]})
    emit({"benchmark": "onednn_shape_cache", **header(a.threads), "model": "memfit-tiny", "dtype": "float32",
          "row_counts": f"1..{a.max_rows} and {','.join(map(str, PREFILL_ROWS))}", "reps": a.reps,
          "load_1min_min_max": [min(loads), max(loads)], "rows": rows}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
