"""memfit's prefill attention kernel (cpu_prefill.cpp): the AVX-512 path against the AMX path, side by side.

Shapes: the 0.1b model's (12 query heads over 4 KV heads of 64; issue 14's prefill workload is 128-token
prompts), a 512-token prompt, a 128-token chunk after a 512-token cached prefix, and memfit-tiny's (8 over 4
heads of 32). K/V are rows of a wider cache slot, read in place, as the engine passes them. The two kernels run
alternately, call by call (a load change on the shared machine hits both alike); each figure is the median
process CPU time of a call over --reps rounds of --inner calls. bf16 only (the AMX path's dtype).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.prefill_attention --threads 1 --out benchmarks/results/prefill_attention.json

Prints one JSON object: per shape, each kernel's microseconds a call and G MAC/s (the multiply-adds of Q.K^T
and P.V over the keys each row may see, causal), and avx512 / amx.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import emit, header, pin_threads
from memfit.llm.kernels.prefill import amx_function, prefill_attention

SHAPES = [  # (name, Tq, Tk, Hq, Hkv, D)
    ("0.1b prompt 128", 128, 128, 12, 4, 64),
    ("0.1b prompt 512", 512, 512, 12, 4, 64),
    ("0.1b chunk 128 after 512", 128, 640, 12, 4, 64),
    ("memfit-tiny prompt 128", 128, 128, 8, 4, 32),
    ("head 128, prompt 256", 256, 256, 8, 2, 128),
]


def macs(tq: int, tk: int, hq: int, d: int) -> int:
    """Multiply-adds of Q.K^T and P.V over the keys each row may see (causal, the chunk at the context's end)."""
    seen = sum(tk - tq + i + 1 for i in range(tq))
    return 2 * hq * d * seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=0, help="calls a timed repetition (0: about 20 ms of work)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    if amx_function() is None:
        emit({"error": "no AMX kernel in this process (no AMX-BF16, or Linux refused the tile state)"}, args.out)
        return 1
    load_before = os.getloadavg()
    rows = []
    for name, tq, tk, hq, hkv, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(tq, hq, d, generator=g).bfloat16()
        cache = torch.randn(2, tk + 16, hkv + 2, d, generator=g).bfloat16()
        k, v = cache[0, 8 : 8 + tk, 1 : 1 + hkv], cache[1, 8 : 8 + tk, 1 : 1 + hkv]
        outs = {kern: torch.empty_like(q) for kern in ("avx512", "amx")}

        def call(kern: str) -> None:
            assert prefill_attention(q, k, v, d ** -0.5, None, outs[kern], nthreads=args.threads, kernel=kern)

        call("avx512"), call("amx")
        t0 = time.process_time()
        call("avx512")
        one = max(time.process_time() - t0, 1e-5)
        inner = args.inner or max(1, int(0.02 / one))
        times: dict[str, list[float]] = {"avx512": [], "amx": []}
        for _ in range(args.reps):
            for kern in times:
                t0 = time.process_time()
                for _ in range(inner):
                    call(kern)
                times[kern].append((time.process_time() - t0) / inner)
        med = {kern: statistics.median(t) for kern, t in times.items()}
        n = macs(tq, tk, hq, d)
        diff = (outs["amx"].float() - outs["avx512"].float()).abs().max().item()
        rows.append({"shape": name, "tq": tq, "tk": tk, "hq": hq, "hkv": hkv, "d": d, "inner": inner,
                     **{f"{kern}_us": round(m * 1e6, 1) for kern, m in med.items()},
                     **{f"{kern}_gmacs": round(n / m / 1e9, 1) for kern, m in med.items()},
                     "avx512_over_amx": round(med["avx512"] / med["amx"], 2),
                     "amx_range_us": [round(min(times["amx"]) * 1e6, 1), round(max(times["amx"]) * 1e6, 1)],
                     "avx512_range_us": [round(min(times["avx512"]) * 1e6, 1), round(max(times["avx512"]) * 1e6, 1)],
                     "max_abs_diff": diff})
    result = header(args.threads, 0, benchmark="prefill_attention", reps=args.reps,
                    clock="process CPU time, median", load_before=load_before, load_after=os.getloadavg())
    result["rows"] = rows
    emit(result, args.out)
    # the two paths differ by P's bf16 rounding only: a difference of a whole output means a broken kernel
    # (a stale or mismatched build in the kernel cache showed up here as 3.27)
    return 0 if all(r["max_abs_diff"] < 0.1 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
