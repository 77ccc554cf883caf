"""Decode matmuls on a CPU: oneDNN prepacked (PackedLinear) vs memfit row-major (RowMajorLinear) vs memfit
blocked (BlockedLinear: packed into one huge-page arena as the engine does, and the same on 4 KiB pages as
`blocked_4k`), over the matrices of a Llama-shaped layer stack plus its lm_head.

One timed pass runs every layer's q, k, v, o, gate, up, down and then the lm_head on an (M, K) input, with
each kernel holding its own copy of the weights; the stack is several layers deep (about 200 MB of weights
per copy in bf16), far past the caches, so a pass measures streaming the weights, as decode does. The
kernels run interleaved rep by rep (median of --reps), every kernel on --threads threads (default 1).

    python -m benchmarks.blocked_linear --out benchmarks/results/blocked_linear.json

Prints one JSON object (ms per pass; GB/s of weight read; GMAC/s; blocked vs the others as speed-ups,
time_a / time_c, > 1 means the blocked kernel is faster) and draws a PNG beside --out.
"""
from __future__ import annotations

from benchmarks.common import preset_threads

if __name__ == "__main__":
    preset_threads()  # --threads, read before torch and oneDNN start their thread pools

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import emit, header, interleave, pin_threads


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int  # layers in the timed stack (enough for ~200 MB of bf16 weights with the head)

    def matrices(self) -> list[tuple[str, int, int]]:
        """(name, N, K) of one layer's linears, in the order a decode step runs them."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q), ("gate", i, h), ("up", i, h), ("down", h, i)]


SHAPES = {
    "0.1b": Shape(768, 2048, 12, 4, 64, 32000, layers=12),  # 100M parameters
    "0.5b": Shape(896, 4864, 14, 2, 64, 151936, layers=4),  # 4 of the 24 layers + the 136M head: 196M
}
# blocked: memfit's kernel as the engine runs it, every packed weight in one huge-page arena (memfit.memory.host);
# blocked_4k: the same packing on ordinary 4 KiB pages, to show what the huge pages give.
KERNELS = ("onednn", "rowmajor", "blocked", "blocked_4k")


def build(shape: Shape, dtype: torch.dtype, seed: int) -> tuple[dict[str, list[nn.Module]], list[int], int]:
    """Each kernel's modules for the stack, the K of each, and the parameter count."""
    from memfit.llm.kernels.blocked import pack_blocked
    from memfit.llm.kernels.linear import RowMajorLinear
    from memfit.llm.models.packing import PackedLinear

    torch.manual_seed(seed)
    dims = [(n, k) for _ in range(shape.layers) for _, n, k in shape.matrices()] + [(shape.vocab, shape.hidden)]
    mods: dict[str, list[nn.Module]] = {k: [] for k in KERNELS}
    lins = []
    for n, k in dims:
        lin = nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
        lin.weight.normal_(0, 0.02)
        mods["onednn"].append(PackedLinear(lin))
        mods["rowmajor"].append(RowMajorLinear(lin, max_rows=1 << 20))  # shares lin's weight
        lins.append(lin)
    # torch.get_num_threads() threads (--threads); one arena per stack, in pass order, as the engine packs
    mods["blocked"] = pack_blocked(lins, huge_pages=True)
    mods["blocked_4k"] = pack_blocked(lins, huge_pages=False)
    return mods, [k for _, k in dims], sum(n * k for n, k in dims)


def run_shape(name: str, shape: Shape, dtype: torch.dtype, rows: list[int], reps: int, bar) -> list[dict]:
    mods, ks, params = build(shape, dtype, seed=0)
    nbytes = params * torch.empty((), dtype=dtype).element_size()
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k).to(dtype) for k in set(ks)}  # (M, K) inputs
        inputs = [xs[k] for k in ks]

        def one_pass(kernel: str, inputs: list[torch.Tensor] = inputs) -> None:
            for mod, x in zip(mods[kernel], inputs):
                mod(x)

        with torch.no_grad():  # one warm-up round (first touches, lazy inits), then kernels interleaved
            times = interleave({k: (lambda k=k: one_pass(k)) for k in KERNELS}, reps, on_round=lambda: bar.update(1))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "rows": m}
        for k in KERNELS:
            row[k] = {"ms": med[k] * 1e3, "weight_gb_per_s": nbytes / med[k] / 1e9, "gmac_per_s": m * params / med[k] / 1e9}
        row["blocked_speedup_vs_onednn"] = med["onednn"] / med["blocked"]
        row["blocked_speedup_vs_rowmajor"] = med["rowmajor"] / med["blocked"]
        row["huge_page_speedup"] = med["blocked_4k"] / med["blocked"]
        out.append(row)
        bar.write(json.dumps({"shape": name, "dtype": row["dtype"], "rows": m,
                              **{k: round(row[k]["ms"], 2) for k in KERNELS}}), file=sys.stderr)
    return out


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["shape"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], combos):
        sel = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
        for k in KERNELS:
            ax.plot([r["rows"] for r in sel], [r[k]["gmac_per_s"] for r in sel], marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows (M)")
        ax.set_ylabel(f"GMAC/s, {torch.get_num_threads()} thread(s)")
        ax.set_title(f"{shape} {dtype}")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="threads for every kernel (default 1)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (and a PNG beside it)")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    pin_threads(args.threads)
    from tqdm import tqdm

    from memfit.llm.kernels.blocked import DEFAULT_NB, can_use_blocked
    from memfit.llm.kernels.build import unavailable_reason
    from memfit.llm.models.packing import can_pack_for_cpu

    for d in args.dtypes:
        dtype = getattr(torch, d)
        if not can_use_blocked(dtype) or not can_pack_for_cpu(dtype):
            print(f"error: {d}: memfit kernel: {unavailable_reason(dtype) or 'ok'}; oneDNN packing: "
                  f"{'ok' if can_pack_for_cpu(dtype) else 'unavailable'}", file=sys.stderr)
            return 1
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tqdm(total=len(args.shapes) * len(args.dtypes) * len(args.rows) * args.reps, file=sys.stderr) as bar:
        for s in args.shapes:
            for d in args.dtypes:
                rows += run_shape(s, SHAPES[s], getattr(torch, d), args.rows, args.reps, bar)
    result = {"benchmark": "blocked_linear", **header(args.threads, seed=0), "nb": DEFAULT_NB, "reps": args.reps,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "shapes": {s: {**SHAPES[s].__dict__, "matrices": SHAPES[s].matrices()} for s in args.shapes},
              "rows": rows}
    emit(result, args.out, lambda r, png: draw(r["rows"], png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
