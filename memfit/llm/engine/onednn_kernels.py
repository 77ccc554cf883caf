"""What one kernel in oneDNN's caches holds on this machine, measured once per machine and build, then cached.

On the oneDNN linear path (models/packing.py) PyTorch's ideep compiles a computation, and oneDNN a primitive, per
input shape, and keeps them for the rest of the process: one per (row bucket, matrix shape). The ledger counts
them (`fallback_accounting.shape_cache_bytes`). Their size depends on the CPU (which ISA oneDNN's JIT targets)
and on the oneDNN build: 510-700 KiB of heap a kernel on the Intel host the first constant was fitted on,
~525 KiB on an AMD Zen 4 without AMX, where the constant (768 KiB) counted memfit-tiny's 65 kernels 15 MiB high
and left the runtime calibration nothing to find. So it is measured here, as the runtime's share is
(calibrate.py), and cached beside it:

    python -m memfit.llm.engine.onednn_kernels --json

A fresh process packs memfit-tiny's five float32 matrices, calls each once (what packing and a first call set up
is not a kernel), then once at every row bucket: the heap in use (glibc's mallinfo2, the allocator's own count)
grows by the kernels built, nothing else staying alive. The figure is the most a kernel held over three such
processes, and over the matrices (the larger matrix's kernel may be larger). Where it cannot be measured (no
oneDNN packing, no glibc) the Intel-fitted constant stands.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

FALLBACK_BYTES = 768 * 1024  # the Intel host's most (heap 510-700 KiB, RssAnon 590-705 KiB a kernel), rounded up
DRAWS = 3
_memo: int | None = None


def measure() -> dict:
    """In this process, which must not have run oneDNN yet: {"kernel_bytes", "kernels", "by_matrix"}."""
    import gc

    import torch

    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.packing import ROW_BUCKETS, PackedLinear, can_pack_for_cpu
    from memfit.llm.models.shapes import linear_shapes
    from memfit.memory.measure import heap_in_use_bytes

    if not can_pack_for_cpu(torch.float32):
        raise RuntimeError("this torch build or CPU has no oneDNN linear packing")
    torch.set_num_threads(1)
    cfg = ModelConfig.from_dir(resolve_model_path("memfit-tiny"))
    mats = sorted(set(linear_shapes(cfg, fused=True)))  # (out, in): qkv, o, gate|up, down, head
    lins = [PackedLinear(torch.nn.Linear(k, n, bias=False)) for n, k in mats]
    xs = {k: torch.randn(ROW_BUCKETS[-1], k) for _, k in mats}  # made before any count is taken
    by_matrix = {}
    with torch.inference_mode():
        for lin in lins:
            lin(xs[lin.in_features][:1])  # packing's and the first call's own setup, not a shape's kernel
        for lin, (n, k) in zip(lins, mats):
            gc.collect()
            before = heap_in_use_bytes()
            for rows in ROW_BUCKETS[1:]:
                lin(xs[k][:rows])  # the result is dropped at once: only the kernel stays
            gc.collect()
            by_matrix[f"{n}x{k}"] = (heap_in_use_bytes() - before) // (len(ROW_BUCKETS) - 1)
    return {"kernel_bytes": max(by_matrix.values()), "kernels": len(mats) * (len(ROW_BUCKETS) - 1),
            "by_matrix": by_matrix}


# A kernel below this is not a kernel: the heap count missed it (another allocator preloaded, mallinfo2 blind)
PLAUSIBLE_MIN_BYTES = 64 * 1024


def kernel_bytes(measure: bool = True) -> int:
    """The bytes one cached oneDNN kernel holds here: from the calibration cache, else (`measure`) measured now in
    fresh processes (the most of DRAWS, rounded up to 4 KiB) and cached. FALLBACK_BYTES where it is not measured,
    or the measurement fails or is implausible (neither of which is cached: the next process tries again)."""
    global _memo
    if _memo is not None:
        return _memo
    from memfit.llm.engine import calibration_cache as cache

    key = "onednn-kernel|" + cache.cache_key("cpu", "float32", "onednn", True)
    entry = cache.read_cache().get(key)
    if entry is None and not measure:
        return FALLBACK_BYTES
    if entry is None:
        try:
            draws = [_draw() for _ in range(DRAWS)]
            if min(draws) < PLAUSIBLE_MIN_BYTES:
                raise ValueError(f"implausible kernel sizes {draws}")
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            log.warning("could not measure oneDNN's kernel size here (%s); counting %d KiB a kernel",
                        (str(e).strip().splitlines() or [type(e).__name__])[-1], FALLBACK_BYTES >> 10)
            return FALLBACK_BYTES
        entry = {"kernel_bytes": -(-max(draws) // 4096) * 4096, "draws": draws}
        cache.write_cache_entry(key, entry)
    _memo = int(entry["kernel_bytes"])
    return _memo


def _draw() -> int:
    """One measurement, in a fresh process (`measure` needs one where oneDNN has not run)."""
    done = subprocess.run([sys.executable, "-m", "memfit.llm.engine.onednn_kernels", "--json"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1000:] or f"exit status {done.returncode}")
    return int(json.loads(done.stdout)["kernel_bytes"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.llm.engine.onednn_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure()
    print(json.dumps(r) if a.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
