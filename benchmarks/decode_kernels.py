"""memfit's CPU decode kernels against the PyTorch path they replace, side by side in one process.

- attention: one decode token per sequence over a cache view (the 0.1b shape: 12 query heads over 4 KV heads
  of 64), PyTorch path (`attention.decode_attention` / `attend_one`, what the paged cache and
  `--no-cpu-kernels` run) against `CpuDecodeOps.decode_attention` reading the cache in place;
- element-wise ops at decode sizes (RMSNorm with the residual add, RoPE, SiLU * up, greedy argmax):
  `TorchOps` against `CpuDecodeOps`;
- whole decode steps of the 0.1b model on the same matmul backend (blocked): PyTorch ops, memfit's op
  kernels called op by op, and the one-call decode stack (with q/k/v and gate/up fused, and without);
- prefill of a 512-token prompt with each CPU matmul backend (blocked, oneDNN, row-major = F.linear there).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_kernels --threads 1 --out benchmarks/results/decode_kernels.json

Prints one JSON object. Times are process CPU time (robust to a busy machine), median of --reps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_us, emit, header, pin_threads
from benchmarks.decode_setup import make_model_dir
from memfit.llm.kernels.attention import Workspace, attend_one, decode_attention
from memfit.llm.kernels.decode import CpuDecodeOps
from memfit.llm.models.ops import TorchOps

HQ, HKV, D = 12, 4, 64


def attention_rows(dtype: torch.dtype, reps: int) -> list[dict]:
    ops, ws, rows = CpuDecodeOps(dtype), Workspace(), []
    for b, length in ((1, 64), (1, 1024), (1, 4096), (8, 256), (8, 4096), (32, 64), (32, 1024)):
        kc = torch.randn(b, length + 64, HKV, D).to(dtype)  # (slots, Lmax, Hkv, D), as a cache holds it
        vc = torch.randn(b, length + 64, HKV, D).to(dtype)
        q = torch.randn(b, HQ, D).to(dtype)
        slots, lens = torch.arange(b, dtype=torch.int64), torch.full((b,), length, dtype=torch.int64)
        inner = max(1, 4000 // (b * length // 16 + 1))
        with torch.inference_mode():
            if b == 1:
                torch_fn = lambda: attend_one(q, kc[0, :length], vc[0, :length], 0.125)  # noqa: E731
            else:
                torch_fn = lambda: decode_attention(q, kc[:, :length], vc[:, :length], None, 0.125, ws)  # noqa: E731
            row = {"batch": b, "context": length, "torch_us": cpu_us(torch_fn, reps, inner),
                   "memfit_us": cpu_us(lambda: ops.decode_attention(q, kc, vc, slots, lens, 0.125), reps, inner)}
        row["speedup"] = round(row["torch_us"] / row["memfit_us"], 2)
        rows.append(row)
    return rows


def op_rows(dtype: torch.dtype, reps: int) -> list[dict]:
    ref, ops, rows = TorchOps(), CpuDecodeOps(dtype), []
    for m in (1, 32):
        x, r = torch.randn(m, 768).to(dtype), torch.randn(m, 768).to(dtype)
        w = torch.rand(768).to(dtype)
        qkv = torch.randn(m, (HQ + 2 * HKV) * D).to(dtype)
        q, k = qkv[:, :HQ * D].view(m, HQ, D), qkv[:, HQ * D:(HQ + HKV) * D].view(m, HKV, D)
        cos, sin = torch.randn(m, 1, D).to(dtype), torch.randn(m, 1, D).to(dtype)
        gu = torch.randn(m, 2 * 2048).to(dtype)
        g, u = gu.chunk(2, dim=-1)
        logits = torch.randn(m, 32000).to(dtype)
        cases = {"add_rms_norm": lambda o: o.add_rms_norm(x, r, w, 1e-6),
                 "rope": lambda o: o.rope(q, k, cos, sin),
                 "silu_mul": lambda o: o.silu_mul(g, u),
                 "argmax": lambda o: o.argmax(logits)}
        with torch.inference_mode():
            for name, fn in cases.items():
                row = {"op": name, "rows": m, "torch_us": cpu_us(lambda: fn(ref), reps, 200),
                       "memfit_us": cpu_us(lambda: fn(ops), reps, 200)}
                row["speedup"] = round(row["torch_us"] / row["memfit_us"], 2)
                rows.append(row)
    return rows


def step_rows(dtype: str, reps: int, batches: list[int]) -> list[dict]:
    """Decode step time of the 0.1b model: PyTorch ops / memfit op kernels / the one-call stack."""
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir("0.1b", dtype, Path(tmp))
        for b in batches:
            row: dict = {"dtype": dtype, "batch": b}
            for label, kernels, stack, fuse in (("torch_ops", False, False, True), ("memfit_ops", True, False, True),
                                                ("memfit_stack", True, True, True),
                                                ("memfit_stack_unfused", True, True, False)):
                eng = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_budget="2GiB", max_num_seqs=b,
                                             max_model_len=512, cpu_linear="blocked", cpu_kernels=kernels, fuse=fuse))
                if not stack:
                    eng.runner.stack = None
                g = torch.Generator().manual_seed(1)
                for _ in range(b):
                    eng.add_request(prompt_token_ids=torch.randint(0, 32000, (32,), generator=g).tolist(),
                                    params=SamplingParams(max_tokens=4 + 8 * reps, temperature=0, ignore_eos=True))
                for _ in range(4):  # prefill and warm-up
                    eng.step()
                times = []
                while eng.has_unfinished_requests():
                    t = time.process_time()
                    eng.step()
                    times.append((time.process_time() - t) * 1e3)
                eng.close()
                row[f"{label}_ms"] = round(statistics.median(times), 2)
            row["stack_vs_torch_ops"] = round(row["torch_ops_ms"] / row["memfit_stack_ms"], 2)
            row["fused_vs_unfused"] = round(row["memfit_stack_unfused_ms"] / row["memfit_stack_ms"], 3)
            rows.append(row)
    return rows


def prefill_rows(dtype: str, reps: int, prompt: int = 512) -> list[dict]:
    """Time to prefill one `prompt`-token prompt (0.1b shape) with each CPU matmul backend: the blocked
    backend's packed weights serve prefill too, so it must not lose much to oneDNN there."""
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir("0.1b", dtype, Path(tmp))
        engines = {b: LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_budget="2GiB", max_num_seqs=4,
                                             max_num_batched_tokens=prompt, max_model_len=2 * prompt, cpu_linear=b))
                   for b in ("blocked", "onednn", "memfit")}
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {b: [] for b in engines}
        for rep in range(reps + 1):  # interleaved; the first round warms up
            ids = torch.randint(0, 32000, (prompt,), generator=g).tolist()
            for b, eng in engines.items():
                eng.add_request(prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0))
                t = time.process_time()
                while eng.has_unfinished_requests():
                    eng.step()
                if rep:
                    times[b].append((time.process_time() - t) * 1e3)
        for eng in engines.values():
            eng.close()
    row = {"dtype": dtype, "prompt_tokens": prompt, **{f"{b}_ms": round(statistics.median(v), 1) for b, v in times.items()}}
    row["blocked_vs_onednn"] = round(row["onednn_ms"] / row["blocked_ms"], 3)
    return [row]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    if not CpuDecodeOps.available(torch.bfloat16):
        print(json.dumps({"error": "memfit's CPU kernels are unavailable here (see the log)"}))
        return 1
    result = {"benchmark": "decode_kernels", **header(args.threads), "reps": args.reps,
              "timer": "process CPU time, median"}
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).split(".")[1]
        result[f"attention_{name}"] = attention_rows(dt, args.reps)
        result[f"ops_{name}"] = op_rows(dt, args.reps)
    result["decode_step"] = step_rows("bfloat16", args.reps, args.batches) + step_rows("float32", args.reps, args.batches)
    result["prefill"] = prefill_rows("bfloat16", args.reps) + prefill_rows("float32", args.reps)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
