"""What oneDNN's caches keep per step size on the oneDNN linear path (issue 16: memory that grows over a multi-turn
workload beside the KV), as one JSON object.

    python -m benchmarks.onednn_shape_cache --threads 1 --out benchmarks/results/onednn_shape_cache.json

Where memfit's blocked kernels do not run (a CPU without AVX-512, or --cpu-linear onednn), a packed linear is
`torch.ops.mkldnn._linear_pointwise` (models/packing.py). PyTorch's ideep keeps a compiled computation per input
shape (an LRU of LRU_CACHE_CAPACITY entries, default 1024) and oneDNN a primitive per shape (a cache of
ONEDNN_PRIMITIVE_CACHE_CAPACITY, default 1024), in the C heap, for the rest of the process. The runner keeps steps of
up to 64 rows at their exact size (runner.bucket_tokens), so every new prompt tail, batch or verification size adds
entries. Each configuration runs in a fresh process: memfit-tiny (float32, oneDNN linears, PyTorch ops), its whole
model run at every row count 1..64, twice; reported: the C heap's bytes in use (glibc mallinfo2, not RSS: freed
pages kept by malloc are not counted) added by each round, and the CPU seconds of each round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import emit, header

CONFIGS = {
    "default": {},
    "ideep_lru_1": {"LRU_CACHE_CAPACITY": "1"},
    "onednn_cache_0": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
    "both_off": {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
}


def worker(threads: int, max_rows: int) -> dict:
    import ctypes
    import gc

    import torch

    torch.set_num_threads(threads)
    from memfit.llm.engine.api import LLM
    from memfit.llm.kernels.attention import DenseCausalAttention

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)  # heap chunks in use + mmapped chunks

    eng = LLM(model="memfit-tiny", dtype="float32", cpu_linear="onednn", cpu_kernels=False,
              enable_prefix_caching=False).engine
    model = eng.model
    rounds = []
    with torch.inference_mode():
        for _ in range(2):
            gc.collect()
            before, t0 = in_use(), time.process_time()
            for m in range(1, max_rows + 1):
                model(torch.randint(0, 4000, (m,)), torch.arange(m), DenseCausalAttention([m], model.scale))
            gc.collect()
            rounds.append({"heap_in_use_added_bytes": in_use() - before, "cpu_s": time.process_time() - t0})
    return {"backends": str(eng.backends), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=64, help="row counts 1..N (the runner's exact-size steps)")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.threads, a.max_rows)))
        return 0
    rows = []
    for name, env in CONFIGS.items():
        out = subprocess.run([sys.executable, "-m", "benchmarks.onednn_shape_cache", "--worker", "--threads",
                              str(a.threads), "--max-rows", str(a.max_rows)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(a.threads), **env}, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"config": name, "env": env, **r})
    emit({"benchmark": "onednn_shape_cache", **header(a.threads), "model": "memfit-tiny", "dtype": "float32",
          "row_counts": f"1..{a.max_rows}", "load_before": os.getloadavg(), "rows": rows}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
