"""Decode throughput of memfit's engine against transformers `generate()`, side by side in one run.

For each model shape (random-initialised Llama shapes, ~0.1B and ~0.5B), dtype and batch size, both
engines decode the same number of tokens from the same prompts with greedy sampling. The decode rate
excludes prefill (time from the first generated token to the last); with one CPU thread every system's time is
its process's CPU time (decode_setup.decode_clock: what other jobs on a shared machine do not add to), else the
wall time; each row's `memfit_runs` keep both. Each figure is also expressed as a
fraction of this machine's limit: the bytes one decode step must read (all weights + the KV of every
sequence) divided by the memory bandwidth this script measures itself (the fastest of three streaming reads
with the same thread count: torch's sum, and 1-row GEMVs through memfit's row-major and blocked kernels, the
blocked one on huge pages as the engine holds its weights), read again before each shape/dtype block; every
row uses the highest reading of the run.
Beside it, the compute roof: the step's multiply-adds (every weight matrix once per sequence, plus attention)
divided by the core's multiply-add peak, measured by a register-only loop (memfit.llm.kernels.peak); rows
report `compute_limit_tok_per_s`, `roofline_limit_tok_per_s` (the lower roof), `memfit_fraction_of_roofline`
and `speedup_ceiling_vs_transformers` (the roofline limit over transformers' rate: no engine can beat it).

    python -m benchmarks.decode_throughput --threads 1 --shapes 0.1b --dtypes bfloat16 --batches 1 8 32

Prints one JSON object; --out also writes it to a file and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, header, pin_threads
from benchmarks.decode_setup import (SHAPES, clock_name, decode_clock, make_model_dir, measure_bandwidth, run_memfit,
                                     sync)


def decode_bytes(cfg, dtype: torch.dtype, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once, plus K and V of `context` tokens per sequence.
    An untied embedding table is the exception: the lookup reads only the step's `batch` rows of it (a tied
    one is read whole, as the output layer)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    weights = cfg.num_parameters()
    if not cfg.tie_word_embeddings:
        weights -= (cfg.vocab_size - min(batch, cfg.vocab_size)) * cfg.hidden_size
    return weights * itemsize + batch * context * kv_per_token


def decode_macs_per_token(cfg, context: int) -> int:
    """Multiply-adds one decode token needs: every weight matrix once (an untied embedding is a lookup, not a
    product; norm weights are scales), plus attention's q.k and p.v over `context` positions."""
    matrices = cfg.num_parameters() - (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    if not cfg.tie_word_embeddings:
        matrices -= cfg.vocab_size * cfg.hidden_size
    return matrices + 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context


def add_limits(row: dict, bw: float, backends: list[str]) -> None:
    """The row's limits at bandwidth `bw` (bytes/s) and the fractions of them memfit reached."""
    limit = row["batch"] * bw / row["step_bytes"]
    row.update(bandwidth_bytes_per_s=bw, limit_tok_per_s=limit)
    for b in backends:
        row[f"memfit_{b}_fraction_of_limit"] = row[f"memfit_{b}_tok_per_s"] / limit
    row["memfit_fraction_of_limit"] = row["memfit_tok_per_s"] / limit
    if "compute_limit_tok_per_s" in row:
        row["roofline_limit_tok_per_s"] = min(limit, row["compute_limit_tok_per_s"])
        row["memfit_fraction_of_roofline"] = row["memfit_tok_per_s"] / row["roofline_limit_tok_per_s"]
        if "transformers_tok_per_s" in row:  # the most any engine could gain over transformers here
            row["speedup_ceiling_vs_transformers"] = row["roofline_limit_tok_per_s"] / row["transformers_tok_per_s"]


def run_transformers(path: Path, dtype: str, batch: int, prompt_len: int, new_tokens: int, device: torch.device) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval().to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (CUDA kernels, caches)
        sync(device)
        clock = decode_clock(device)  # the clock memfit's and vLLM's sides are read on
        t0 = clock()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # prefill + first token
        sync(device)
        t1 = clock()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(device)
        t2 = clock()
    decode_s = (t2 - t1) - (t1 - t0)
    n = batch * (new_tokens - 1)
    return {"decode_tokens": n, "decode_s": decode_s, "timer": clock_name(clock), "tok_per_s": n / decode_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["0.1b", "0.5b"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell; the median is reported")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--vllm-python", default=None,
                    help="python of a venv with vLLM's CPU build: adds vLLM as a peer (bf16 only; "
                         "benchmarks/decode_vllm.py, decode time as a difference of two calls on prefix-cached prompts)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (both engines run there)")
    ap.add_argument("--kv-layout", default="auto", choices=["auto", "per-layer", "token-major", "head-major"])
    ap.add_argument("--cpu-linear", nargs="+", default=["auto"], choices=["auto", "blocked", "memfit", "onednn"],
                    help="CPU linear backend(s); several are measured side by side, interleaved rep by rep")
    ap.add_argument("--kv-caches", nargs="+", default=None, choices=["virtual", "paged"],
                    help="KV cache(s) (default: the engine's); several are measured side by side like backends, "
                         "as BACKEND_KIND variants")
    ap.add_argument("--out", default=None, help="also write the JSON here (and a PNG beside it)")
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm.kernels.peak import peak_macs_per_s
    from memfit.llm.models.config import ModelConfig

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # The machine's read bandwidth drifts (25-33 GB/s between runs here), so it is measured again before each
    # shape/dtype block, and every row's limit uses the *highest* reading of the run: a reading taken while
    # another job loads the memory bus would otherwise lower the limit and flatter the fraction (one low
    # reading put a batch-1 fraction at 1.03). The block's own reading stays in the row.
    kinds = args.kv_caches or [None]
    variants = {b if len(kinds) == 1 else f"{b}_{kv}": (b, kv) for b in args.cpu_linear for kv in kinds}
    bw_detail: dict = {}
    bw = measure_bandwidth(args.threads, device, detail=bw_detail)
    readings = [bw]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for dtype in args.dtypes:
                path = make_model_dir(shape, dtype, Path(tmp))
                cfg = ModelConfig.from_dir(path)
                if rows:  # the first block uses the reading above
                    bw = measure_bandwidth(args.threads, device)
                    readings.append(bw)
                # The compute roof: this core's multiply-add peak for the dtype (None off CPU / without kernels).
                peak = peak_macs_per_s(getattr(torch, dtype), args.threads) if device.type == "cpu" else None
                for batch in args.batches:
                    context = args.prompt_len + args.new_tokens // 2  # mean context during decode
                    row = {"shape": shape, "dtype": dtype, "batch": batch, "params": cfg.num_parameters(),
                           "step_bytes": decode_bytes(cfg, getattr(torch, dtype), batch, context),
                           "block_bandwidth_bytes_per_s": bw}
                    if peak:  # the compute roof beside the bandwidth one (the limit stays the headline)
                        macs = decode_macs_per_token(cfg, context)
                        row.update(macs_per_token=macs, peak_macs_per_s=peak, compute_limit_tok_per_s=peak / macs)
                    # Variants alternate rep by rep, so a busy machine's swings hit them alike.
                    runs: dict[str, list[dict]] = {name: [] for name in variants}
                    for _ in range(args.reps):
                        for name, (b, kv) in variants.items():
                            r = run_memfit(path, dtype, batch, args.prompt_len, args.new_tokens, device,
                                           args.kv_layout, b, kv)
                            runs[name].append({k: r[k] for k in ("tok_per_s", "decode_s", "decode_wall_s", "timer")})
                    row["memfit_runs"] = runs
                    m = {name: [r["tok_per_s"] for r in rs] for name, rs in runs.items()}
                    for name in variants:
                        row[f"memfit_{name}_tok_per_s"] = statistics.median(m[name])
                    first = next(iter(variants))
                    row["memfit_tok_per_s"] = row[f"memfit_{first}_tok_per_s"]
                    if len(variants) > 1:  # per-rep ratios of the first variant to each other
                        for b in list(variants)[1:]:
                            row[f"ratio_{first}_vs_{b}"] = statistics.median(a / o for a, o in zip(m[first], m[b]))
                    if not args.skip_transformers:
                        t = [run_transformers(path, dtype, batch, args.prompt_len, args.new_tokens, device)["tok_per_s"] for _ in range(args.reps)]
                        row["transformers_tok_per_s"] = statistics.median(t)
                        row["speedup_vs_transformers"] = row["memfit_tok_per_s"] / row["transformers_tok_per_s"]
                    if args.vllm_python and dtype == "bfloat16" and device.type == "cpu":
                        row.update(run_vllm(args.vllm_python, path, batch, args.prompt_len, args.new_tokens,
                                            args.reps, args.threads))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
                shutil.rmtree(path)
    for row in rows:
        add_limits(row, max(readings), list(variants))
    result = {
        "benchmark": "decode_throughput", **header(args.threads, seed=1), "device": str(device),
        "measured_bandwidth_bytes_per_s": max(readings), "bandwidth_readings_bytes_per_s": readings,
        "bandwidth_by_method": bw_detail, "kv_layout": args.kv_layout, "cpu_linear": args.cpu_linear, "kv_caches": args.kv_caches, "variants": list(variants), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "reps": args.reps, "rows": rows,
    }
    emit(result, args.out, plot)
    return 0


def vllm_command(python: str, path: Path, batch: int, prompt_len: int, new: int, reps: int, threads: int) -> list[str]:
    """benchmarks/decode_vllm.py's command line; its last argument names the clock memfit's side is read on at
    `threads` CPU threads (decode_setup.decode_clock): "process" at one thread, else "wall"."""
    clock = "process" if decode_clock(torch.device("cpu"), threads) is time.process_time else "wall"
    script = Path(__file__).with_name("decode_vllm.py")
    return [python, str(script), str(path), str(batch), str(prompt_len), str(new), str(reps), clock]


def run_vllm(python: str, path: Path, batch: int, prompt_len: int, new: int, reps: int, threads: int) -> dict:
    """vLLM's decode rate (benchmarks/decode_vllm.py in its own venv), or an error that says why it did not run."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="0" if threads == 1 else "all",
                VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run(vllm_command(python, path, batch, prompt_len, new, reps, threads),
                         capture_output=True, text=True, env=env, timeout=3600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"vllm_error": f"vLLM run failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}"}
    raw = json.loads(line[7:])
    return {"vllm_tok_per_s": statistics.median(raw["tok_per_s"]), "vllm_version": raw["version"],
            "vllm_runs": raw}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    labels = [f"{r['shape']} {short.get(r['dtype'], r['dtype'])} b{r['batch']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9) + 3, 4))
    w = 0.27
    backends = result.get("variants") or result.get("cpu_linear") or ["auto"]
    if len(backends) > 1:  # one bar per CPU linear backend, side by side
        w = 0.8 / (len(backends) + 1)
        for j, b in enumerate(backends):
            ax.bar([i + (j - len(backends) / 2) * w for i in x], [r[f"memfit_{b}_tok_per_s"] for r in rows], w, label=f"memfit ({b})")
        ax.bar([i + len(backends) / 2 * w for i in x], [r["limit_tok_per_s"] for r in rows], w, label="bandwidth limit", alpha=0.4)
    else:
        ax.bar([i - w for i in x], [r["memfit_tok_per_s"] for r in rows], w, label="memfit")
    if len(backends) == 1 and rows and "transformers_tok_per_s" in rows[0]:
        ax.bar(list(x), [r["transformers_tok_per_s"] for r in rows], w, label="transformers")
    if len(backends) == 1 and rows and all("vllm_tok_per_s" in r for r in rows):
        ax.scatter(list(x), [r["vllm_tok_per_s"] for r in rows], marker="o", color="tab:red", zorder=3,
                   label=f"vLLM {rows[0].get('vllm_version', '')}")
    if len(backends) == 1:
        ax.bar([i + w for i in x], [r["limit_tok_per_s"] for r in rows], w, label="bandwidth limit", alpha=0.4)
    if rows and "compute_limit_tok_per_s" in rows[0]:
        ax.scatter(list(x), [r["compute_limit_tok_per_s"] for r in rows], marker="_", s=300, color="black",
                   label="compute limit (measured MAC peak)", zorder=3)
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    where = result.get("cuda") if result.get("device", "cpu").startswith("cuda") else f"{result['threads']} CPU thread(s)"
    ax.set_title(f"decode throughput, {where}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it hid the vLLM marker
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
