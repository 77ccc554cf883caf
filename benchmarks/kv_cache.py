"""KV-cache memory: the `virtual` cache (vAttention) against the `paged` block pool and a static cache.

    python -m benchmarks.kv_cache [--out-dir benchmarks/results] [--threads 2] [--seed 0] [--quick]

(a) decode attention, one layer of a Llama-3.2-1B-shaped model (Hq=32, Hkv=8, D=64; float32 on the CPU,
    bfloat16 on CUDA), batch 8, every sequence at context 512 .. 8192: median time of one decode step's
    plan_step + write + context_batch + SDPA. The virtual cache hands SDPA a strided view (batch slots
    consecutive); the paged cache gathers its blocks first (no paged kernel in PyTorch). Also the
    virtual cache with its slots out of order (a gather), to show why the runner orders batches by slot.
(b) committed vs used bytes over a mixed workload (random prompt/output lengths, requests arriving and
    finishing, a Qwen2.5-0.5B-shaped cache: 24 layers, Hkv=2, D=64, bf16) for both caches, checking the
    documented waste bound at every step; drawn to <out-dir>/kv_cache.png.
(c) how many sequences of a realistic length distribution fit in one fixed budget: virtual and paged
    (allocated at their final length) against a static cache that reserves max_seq_len per sequence
    (Hugging Face StaticCache / gpt-fast style).
JSON goes to stdout and <out-dir>/kv_cache.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import cuda_sync, emit, header, interleave, pin_threads
from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.memory.budget import MemoryBudget

MiB, GiB = 2**20, 2**30


# ---- (a) decode attention step ---------------------------------------------------------------------
def bench_attention(contexts: list[int], batch: int, reps: int, device: torch.device, progress) -> dict:
    hq, hkv, d = 32, 8, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for ctx in contexts:
        layout = KVLayout(1, hkv, d, dtype, max_seq_len=ctx + 1, device=device)
        gen = torch.Generator(device="cpu").manual_seed(ctx)
        data = [(torch.randn(ctx + 1, hkv, d, generator=gen).to(device, dtype),
                 torch.randn(ctx + 1, hkv, d, generator=gen).to(device, dtype)) for _ in range(batch)]
        q = torch.randn(batch, hq, 1, d, generator=gen).to(device, dtype)  # (B, Hq, 1, D)
        caches, steps = {}, {}
        names = ["virtual", "paged", "virtual_unordered"]
        ops = None
        if device.type == "cpu":
            from memfit.llm.kernels.decode import CpuDecodeOps

            if CpuDecodeOps.available(dtype):
                ops = CpuDecodeOps(dtype)
                names.append("virtual_memfit")  # memfit's kernel reading the virtual cache in place
        for name in names:
            kind = "paged" if name == "paged" else "virtual"
            opts = {"max_seqs": batch} if kind == "virtual" else {"max_seqs": batch, "block_size": 16}
            budget = MemoryBudget(batch * (ctx + 64) * layout.bytes_per_token + 64 * MiB)
            cache = caches[name] = create_kv_cache(kind, layout, budget, **opts)
            for sid in range(batch):  # prefill every sequence to ctx tokens (+1 for the decode token)
                if not cache.try_allocate(sid, ctx + 1):
                    raise RuntimeError(f"the {name} cache's budget does not hold {batch} x {ctx + 1} tokens")
                plan = cache.plan_step([SeqStep(sid, 0, ctx)])
                cache.write(0, plan, data[sid][0][:ctx], data[sid][1][:ctx])
            order = list(range(batch)) if name != "virtual_unordered" else list(range(batch))[::-1]
            k_new = torch.stack([data[s][0][ctx] for s in order])  # (B, Hkv, D)
            v_new = torch.stack([data[s][1][ctx] for s in order])

            def step(cache=cache, order=order, k_new=k_new, v_new=v_new, q_step=q[order], ctx=ctx) -> torch.Tensor:
                plan = cache.plan_step([SeqStep(s, ctx, 1) for s in order])  # decode token at position ctx
                cache.write(0, plan, k_new, v_new)
                k, v = cache.context_batch(0, plan)  # (B, ctx+1, Hkv, D): a view, or a gathered copy
                return F.scaled_dot_product_attention(q_step, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)

            def memfit_step(cache=cache, order=order, k_new=k_new, v_new=v_new, q_step=q[order], ctx=ctx) -> torch.Tensor:
                plan = cache.plan_step([SeqStep(s, ctx, 1) for s in order])
                kc, vc = cache.strided(0)  # (slots, Lmax, Hkv, D): the kernel writes the new rows, then reads
                out = ops.decode_attention(q_step[:, :, 0], kc, vc, torch.tensor(plan.slots), torch.tensor(plan.ends),
                                           d ** -0.5, k_new=k_new, v_new=v_new)
                return out.unsqueeze(2)  # (B, Hq, 1, D), as SDPA returns

            steps[name] = memfit_step if name == "virtual_memfit" else step
        # interleaved, so load changes on a shared machine hit all variants alike; two warm-up rounds
        times = interleave(steps, reps, warmup=2, sync=cuda_sync())
        row: dict = {"context": ctx}
        for name in steps:
            row[f"{name}_ms"] = round(1000 * statistics.median(times[name]), 3)
        out = {name: step() for name, step in steps.items()}
        out["virtual_unordered"] = out["virtual_unordered"].flip(0)
        row["same_output"] = all(torch.allclose(out["virtual"].float(), o.float(), atol=1e-4) for o in out.values())
        row["speedup_virtual_vs_paged"] = round(row["paged_ms"] / row["virtual_ms"], 3)
        if "virtual_memfit_ms" in row:
            row["speedup_virtual_memfit_vs_paged"] = round(row["paged_ms"] / row["virtual_memfit_ms"], 3)
        row["paged_gather_bytes"] = 2 * batch * (-(-(ctx + 1) // 16) * 16) * hkv * d * layout.itemsize
        rows.append(row)
        for cache in caches.values():
            cache.close()
        del caches, steps, out
        progress()
    return {"model_shape": {"Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype).replace("torch.", "")},
            "batch": batch, "timed": "plan_step + write(1 token/seq) + context_batch + SDPA, one layer "
            "(virtual_memfit: plan_step + memfit's CPU kernel, which writes the token and reads the cache in place); "
            "median of interleaved reps", "reps": reps, "rows": rows}


# ---- (b) mixed workload: committed vs used ---------------------------------------------------------
QWEN05 = {"num_layers": 24, "num_kv_heads": 2, "head_dim": 64, "dtype": torch.bfloat16}


def sample_lengths(rng: np.random.Generator, n: int, max_len: int) -> list[tuple[int, int]]:
    """(prompt, output) pairs, log-normal like chat traces (median prompt ~ 300, output ~ 180 tokens)."""
    prompt = np.clip(rng.lognormal(np.log(300), 0.9, n), 8, max_len // 2).astype(int)
    output = np.clip(rng.lognormal(np.log(180), 0.8, n), 4, max_len).astype(int)
    output = np.minimum(output, max_len - prompt)
    return list(zip(prompt.tolist(), output.tolist()))


def simulate(kind: str, budget_bytes: int, max_len: int, steps: int, seed: int, progress) -> dict:
    layout = KVLayout(max_seq_len=max_len, **QWEN05)
    budget = MemoryBudget(budget_bytes, name="kv_budget")
    opts = {"max_seqs": 128} if kind == "virtual" else {"max_seqs": 128, "block_size": 16}
    cache = create_kv_cache(kind, layout, budget, **opts)
    rng = np.random.default_rng(seed)
    reqs = sample_lengths(rng, 4000, max_len)
    arrivals = rng.poisson(0.6, steps)  # new requests per step
    waiting: list[tuple[int, int, int]] = []  # (id, prompt, output)
    active: dict[int, list[int]] = {}  # id -> [prompt, output, generated]
    next_req, trace, preempted, bound_ok, finished = 0, [], 0, True, 0
    zeros = torch.zeros(4096, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
    for t in range(steps):
        for _ in range(arrivals[t]):
            p, o = reqs[next_req % len(reqs)]
            waiting.append((next_req, p, o))
            next_req += 1
        batch: list[SeqStep] = []
        # decode: every active sequence appends one token; preempt (recompute later) if it can't grow
        for rid in sorted(active, key=lambda r: cache.slot_of(r) if cache.fixed_stride else r):
            p, o, g = active[rid]
            n = p + g
            if not cache.try_grow(rid, n + 1):
                cache.free(rid)
                waiting.insert(0, (rid, p, o))
                del active[rid]
                preempted += 1
                continue
            batch.append(SeqStep(rid, n, 1))
        # admit waiting requests first-come first-served while they fit (prefill the whole prompt)
        while waiting and len(active) < 128 and cache.try_allocate(waiting[0][0], waiting[0][1] + 1):
            rid, p, o = waiting.pop(0)
            active[rid] = [p, o, 0]
            batch.append(SeqStep(rid, 0, p))
        if batch:
            plan = cache.plan_step(batch)
            n_tok = sum(s.num_new for s in batch)
            if zeros.shape[0] < n_tok:
                zeros = torch.zeros(n_tok, *zeros.shape[1:], dtype=zeros.dtype)
            for layer in range(layout.num_layers):  # (n_tok, Hkv, D) of K and V per layer
                cache.write(layer, plan, zeros[:n_tok], zeros[:n_tok])
        for s in batch:
            if s.num_new == 1:
                active[s.seq_id][2] += 1
        for rid in [r for r, (p, o, g) in active.items() if g >= o]:
            cache.free(rid)
            del active[rid]
            finished += 1
        cache.sync()  # let queued prefaults land so the sample reads one consistent state
        st = cache.stats()
        bound = cache.waste_bound_bytes()
        bound_ok &= st.waste_bytes <= bound
        trace.append({"step": t, "committed": st.committed_bytes, "used": st.used_bytes, "bound": bound,
                      "seqs": st.num_seqs, "budget_used": budget.used_bytes})
        progress()
    idle = getattr(cache, "idle_bytes", 0)
    cache.close()
    busy = [r for r in trace if r["used"] > 0]
    waste_frac = [1 - r["used"] / r["committed"] for r in busy]
    return {
        "kind": kind, "finished": finished, "preempted": preempted, "waste_bound_held_every_step": bool(bound_ok),
        "mean_committed_bytes": int(statistics.mean(r["committed"] for r in trace)),
        "mean_used_bytes": int(statistics.mean(r["used"] for r in trace)),
        "peak_committed_bytes": max(r["committed"] for r in trace),
        "mean_waste_fraction": round(statistics.mean(waste_frac), 4),
        "max_waste_fraction": round(max(waste_frac), 4),
        "mean_seqs": round(statistics.mean(r["seqs"] for r in trace), 2),
        "final_idle_bytes": idle,
        "budget_equals_committed": all(r["budget_used"] == r["committed"] for r in trace),
        "trace": trace,
    }


def plot_workload(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"virtual": "tab:blue", "paged": "tab:orange"}
    for kind, res in results.items():
        steps = [r["step"] for r in res["trace"]]
        ax.plot(steps, [r["committed"] / MiB for r in res["trace"]], color=colors[kind], label=f"{kind}: committed")
        ax.plot(steps, [r["used"] / MiB for r in res["trace"]], color=colors[kind], ls=":", label=f"{kind}: used")
    ax.set_xlabel("engine step")
    ax.set_ylabel("MiB")
    ax.set_title("KV cache: committed vs used bytes, mixed workload (Qwen2.5-0.5B shape, bf16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- (c) concurrency in a fixed budget -------------------------------------------------------------
def concurrency(budget_bytes: int, max_len: int, seed: int) -> dict:
    layout = KVLayout(max_seq_len=max_len, **QWEN05)
    rng = np.random.default_rng(seed + 1)
    lengths = [p + o for p, o in sample_lengths(rng, 20000, max_len)]
    static = budget_bytes // (max_len * layout.bytes_per_token)
    out = {"budget_bytes": budget_bytes, "max_seq_len": max_len, "bytes_per_token": layout.bytes_per_token,
           "mean_seq_len": round(float(np.mean(lengths)), 1), "static_cache_seqs": static}
    for kind in ("virtual", "paged"):
        opts = {"max_seqs": 4096} if kind == "virtual" else {"max_seqs": 4096, "block_size": 16}
        cache = create_kv_cache(kind, layout, MemoryBudget(budget_bytes), **opts)
        n = 0
        while n < len(lengths) and cache.try_allocate(n, lengths[n]):  # each sequence at its final length
            n += 1
        cache.sync()
        st = cache.stats()
        out[f"{kind}_seqs"] = n
        out[f"{kind}_committed_bytes"] = st.committed_bytes
        out[f"{kind}_vs_static"] = round(n / max(static, 1), 2)
        cache.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=400, help="engine steps in the mixed workload")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    contexts = [512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192]
    steps = 60 if args.quick else args.steps
    from rich.progress import Progress

    result: dict = {"benchmark": "kv_cache", "machine": header(args.threads, args.seed), "device": str(device)}
    with Progress(transient=True, console=__import__("rich.console").console.Console(stderr=True)) as prog:
        task = prog.add_task("attention", total=len(contexts))
        result["attention"] = bench_attention(contexts, 8, 3 if args.quick else args.reps, device,
                                              lambda: prog.advance(task))
        budget = 1 * GiB
        task = prog.add_task("workload", total=2 * steps)
        wl = {k: simulate(k, budget, 4096, steps, args.seed, lambda: prog.advance(task)) for k in ("virtual", "paged")}
        task = prog.add_task("concurrency", total=1)
        result["concurrency"] = concurrency(budget, 4096, args.seed)
        prog.advance(task)
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "kv_cache.png")
    plot_workload(wl, png)
    result["workload"] = {"budget_bytes": budget, "max_seq_len": 4096, "steps": steps, "model_shape": "qwen2.5-0.5b",
                          "plot": png, **{k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in wl.items()}}
    at4k = next((r for r in result["attention"]["rows"] if r["context"] == 4096), None)
    result["targets"] = {
        "virtual_speedup_at_4k_ge_1.3": None if at4k is None else at4k["speedup_virtual_vs_paged"] >= 1.3,
        "virtual_concurrency_vs_static_ge_3": result["concurrency"]["virtual_vs_static"] >= 3,
    }
    emit(result, Path(args.out_dir) / "kv_cache.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
