"""What fraction of the memory-bandwidth limit can a CPU decode step reach at all? A roofline for the
decode-throughput benchmark's model shapes, from figures this script measures on this machine.

A decode step at batch B reads every weight once (bytes = params x itemsize) and does B x params
multiply-adds. Its time is at least max(bytes / bandwidth, MACs / peak MAC rate), so the best possible
fraction of the bandwidth limit is (bytes / bandwidth) / max(bytes / bandwidth, MACs / peak). The script
measures: the streaming-read bandwidth (the same measurement benchmarks/decode_throughput.py uses), the
peak multiply-add rate of the matmul library memfit uses on the CPU (oneDNN, prepacked weights, the
best of several row counts), and what that library reaches at each batch on a decode-sized weight
(GB/s of weight read), which bounds what an engine built on it can do.

    OMP_NUM_THREADS=1 python -m benchmarks.linear_roofline --threads 1 --dtypes bfloat16 float32

Prints one JSON object; --out also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.common import emit, header, median_time, pin_threads


def stream_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / median_time(buf.sum, reps)


def onednn_linear(dtype: torch.dtype, rows: int, out_f: int, in_f: int, copies: int, reps: int) -> float:
    """Seconds per (rows x in) @ (in x out) with oneDNN-packed weights; `copies` distinct weights are cycled
    so that each call reads its weight from memory, not from cache."""
    from memfit.llm.models.packing import can_pack_for_cpu

    if not can_pack_for_cpu(dtype):
        raise SystemExit(f"oneDNN packing is not available for {dtype} on this build")
    ws = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(out_f, in_f).to(dtype)) for _ in range(copies)]
    x = torch.randn(rows, in_f).to(dtype)

    def run() -> None:
        for w in ws:
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    return median_time(run, reps) / copies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    bw = stream_bandwidth()
    out_f, in_f = 2048, 768  # the 0.1b shape's MLP projection: 3 MiB in bf16, past L2
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        wbytes = out_f * in_f * itemsize
        copies = max(4, int((256 << 20) // wbytes))  # 256 MiB of weights per timing: far past the caches
        per_batch = {}
        for b in sorted(set(args.batches) | {64, 128}):
            t = onednn_linear(dtype, b, out_f, in_f, copies, args.reps)
            per_batch[b] = {"weight_gb_per_s": wbytes / t / 1e9, "gmac_per_s": b * out_f * in_f / t / 1e9}
        peak_mac = max(v["gmac_per_s"] for v in per_batch.values()) * 1e9
        for b in args.batches:
            t_mem = wbytes / bw
            t_mac = b * out_f * in_f / peak_mac
            rows.append({
                "dtype": name, "batch": b,
                "ceiling_fraction_of_bandwidth_limit": t_mem / max(t_mem, t_mac),
                "onednn_fraction_of_bandwidth_limit": per_batch[b]["weight_gb_per_s"] * 1e9 / bw,
                "onednn_weight_gb_per_s": per_batch[b]["weight_gb_per_s"],
                "onednn_gmac_per_s": per_batch[b]["gmac_per_s"],
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
        rows.append({"dtype": name, "peak_gmac_per_s": peak_mac / 1e9,
                     "gmac_per_s_by_rows": {b: v["gmac_per_s"] for b, v in per_batch.items()}})
    result = {"benchmark": "linear_roofline", **header(args.threads, seed=None),
              "stream_read_bytes_per_s": bw, "weight_shape": [out_f, in_f], "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
