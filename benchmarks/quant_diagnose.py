"""Issue 20: why does lrp-zplus not beat uniform at W3A3 with allocated activations? Measures, per calibration
seed, whether the allocator's predicted cost of moving one layer a width away from the uniform 3-bit body ranks
the layers as the real damage does, and scores candidate allocations, all on held-out TRAINING images (outside
calibration draws 0-2; never the test set).

    OMP_NUM_THREADS=1 python -m benchmarks.quant_diagnose --model vit.safetensors --threads 1 \
        --out benchmarks/results/quant_diagnose_vit3.json

Baseline: the uniform W3A3 body (every free layer's weights and activation group at 3 bits, the patch embedding
and head at 8). For every free layer l, four in-context moves, each the model `quantize_model` builds (assembled
from one quantized copy per width by memfit.quant.context.compose, equal to it): its weights to 2 or 4 bits, or its
activation group (act_groups.py: its input, and for qkv also q/k/v and the softmax) to 2 or 4 bits, the rest at
the baseline. The measured damage of a move is the change of
KL(FP32 || quantized) it causes, on `--heldout` held-out images (the truth) and on the calibration images (what an
allocator could measure). Predictors of the 3 -> 2 damage, compared by Spearman rank correlation with the truth:
  lrp-zplus   s_l x (D_l(2) - D_l(3))  the allocator's own cost (s: relevance share, D: relative distortion)
  share       s_l                       relevance alone
  distortion  D_l(2) - D_l(3)           distortion alone
  fp-sens     KL with only l at 2 bits minus at 3 bits, the rest in FP32 (the `sensitivity` allocator's)
  ctx-calib   the in-context move measured on the calibration images
and the same per element (damage / size), the knapsack's exchange rate. Allocations scored (W3A3mix: average
weight and activation bits 3): uniform (its 3.03 / 3.016 spend), lrp-zplus (3.0 / 3.0, as the benchmark gives it),
lrp-zplus at uniform's spend, ctx (knapsack over {2, 3, 4} with the in-context damages measured on the
calibration images as costs, at uniform's spend), and lrp-ctx (relevance share / mean share x that damage).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.common import emit, header, pin_threads, preset_threads


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> int:
    preset_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint from `memfit quant train-vit`")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", type=int, default=0, help="only the first N free layers' moves (a quick check)")
    ap.add_argument("--out")
    args = ap.parse_args()
    pin_threads(args.threads)
    import torch
    import torch.nn.functional as F

    from memfit.quant.allocate import average_bits, solve_knapsack
    from memfit.quant.allocators import _FIXED_NAMES, FIXED_BITS, allocate_bits
    from memfit.quant.checkpoint import load_checkpoint
    from memfit.quant.context import compose
    from memfit.quant.lrp import quantizable_layers
    from memfit.quant.qmodel import QuantConfig, quantize_model
    from memfit.quant.quantizers import BIT_CHOICES
    from memfit.train.local.data import load_fashion_mnist

    from benchmarks.quant_objective import calibration_split

    model, spec, _ = load_checkpoint(args.model)
    model.eval()
    data = load_fashion_mnist()
    draws, rest = calibration_split(len(data.y_train), args.calib, args.heldout)
    hx, hy = data.x_train[rest], data.y_train[rest]

    @torch.no_grad()
    def logp_of(m, x):
        return torch.cat([F.log_softmax(m(x[i:i + 500]), -1) for i in range(0, len(x), 500)])  # (N, K)

    def kl(logp, ref):
        return float(F.kl_div(logp, ref, log_target=True, reduction="batchmean"))

    ref_h = logp_of(model, hx)
    layers = quantizable_layers(model)
    free = [l for l in layers if l not in _FIXED_NAMES]
    fixed = [l for l in layers if l in _FIXED_NAMES]
    seeds_out = []
    for seed in range(args.seeds):
        cx, cy = data.x_train[draws[seed]], data.y_train[draws[seed]]
        ref_c = logp_of(model, cx)
        cache: dict = {}
        lrp = allocate_bits(model, "lrp-zplus", 3.0, cx, cy, avg_act_bits=3.0, seed=seed, cache=cache)
        allocate_bits(model, "sensitivity", 3.0, cx, cy, avg_act_bits=3.0, seed=seed, cache=cache)
        s = lrp.importance
        dist = {"w": cache[(True, "w_dist")], "a": cache[(True, "a_dist")]}
        fp_sens = {"w": cache[(True, "sensitivity", "weights")], "a": cache[(True, "sensitivity", "acts")]}
        w_sizes = {l: layers[l].weight.numel() for l in layers}
        a_sizes = cache[(True, "a_sizes")]
        sizes = {"w": {l: w_sizes[l] for l in free}, "a": {l: a_sizes[l] for l in free}}
        fixed_of = {"w": {l: (w_sizes[l], FIXED_BITS) for l in fixed},
                    "a": {l: (a_sizes[l], FIXED_BITS) for l in fixed}}
        base = {l: (FIXED_BITS if l in fixed else 3) for l in layers}

        # one quantized copy per width; every allocation below is assembled from them (context.compose, equal to
        # quantize_model's copy of that allocation) instead of calibrating again
        copies = {b: quantize_model(model, cx, QuantConfig({l: (FIXED_BITS if l in fixed else b) for l in layers},
                                                           {l: (FIXED_BITS if l in fixed else b) for l in layers},
                                                           True)) for b in BIT_CHOICES}

        def score(wb, ab):
            qm = compose(copies, wb, ab)
            lh = logp_of(qm, hx)
            return {"kl_heldout": kl(lh, ref_h), "kl_calib": kl(logp_of(qm, cx), ref_c),
                    "top1_heldout": float((lh.argmax(-1) == hy).float().mean())}

        b0 = score(base, base)
        moves = {}  # (kind, layer, bits) -> damages
        for kind in ("w", "a"):
            for l in free:
                if args.smoke and free.index(l) >= args.smoke:
                    moves.update({(kind, l, b): {"heldout": 0.0, "calib": 0.0} for b in (2, 4)})
                    continue
                for b in (2, 4):
                    cfg = dict(base, **{l: b})
                    r = score(cfg, base) if kind == "w" else score(base, cfg)
                    moves[(kind, l, b)] = {"heldout": r["kl_heldout"] - b0["kl_heldout"],
                                           "calib": r["kl_calib"] - b0["kl_calib"]}
            print(f"seed {seed}: {kind} moves done", file=sys.stderr, flush=True)
        corr = {}
        for kind in ("w", "a"):
            truth = [moves[(kind, l, 2)]["heldout"] for l in free]
            preds = {"lrp-zplus": [s[l] * (dist[kind][l][2] - dist[kind][l][3]) for l in free],
                     "share": [s[l] for l in free],
                     "distortion": [dist[kind][l][2] - dist[kind][l][3] for l in free],
                     "fp-sens": [fp_sens[kind][l][2] - fp_sens[kind][l][3] for l in free],
                     "ctx-calib": [moves[(kind, l, 2)]["calib"] for l in free]}
            per = [sizes[kind][l] for l in free]
            corr[kind] = {p: {"raw": spearman(v, truth),
                              "per_element": spearman([x / m for x, m in zip(v, per)],
                                                      [t / m for t, m in zip(truth, per)])}
                          for p, v in preds.items()}
            up = [moves[(kind, l, 4)]["heldout"] for l in free]
            corr[kind]["3->4 gain vs 3->2 loss (heldout)"] = spearman([-u for u in up], truth)
        # allocations at W3A3mix
        u_spend = {k: average_bits({l: 3 for l in free}, sizes[k], fixed_of[k]) for k in ("w", "a")}

        def knap(kind, cost, budget):
            return solve_knapsack({l: {b: cost(l, b) for b in (2, 3, 4)} for l in free}, sizes[kind], budget,
                                  fixed_of[kind], what=kind)

        def ctx_cost(kind, weight=lambda l: 1.0):
            return lambda l, b: 0.0 if b == 3 else weight(l) * moves[(kind, l, b)]["calib"]

        mean_s = statistics.mean(s.values())
        allocs = {
            "uniform": (base, base),
            "lrp-zplus": (lrp.weight_bits, lrp.act_bits),
        }
        eq = allocate_bits(model, "lrp-zplus", u_spend["w"], cx, cy, avg_act_bits=u_spend["a"], seed=seed, cache=cache)
        allocs["lrp-zplus@uniform-spend"] = (eq.weight_bits, eq.act_bits)
        for name, weight in (("ctx", lambda l: 1.0), ("lrp-ctx", lambda l: s[l] / mean_s)):
            wb = knap("w", ctx_cost("w", weight), u_spend["w"])
            ab = knap("a", ctx_cost("a", weight), u_spend["a"])
            allocs[name] = ({l: wb.get(l, FIXED_BITS) for l in layers}, {l: ab.get(l, FIXED_BITS) for l in layers})
        scored = {}
        for name, (wb, ab) in allocs.items():
            r = score(wb, ab)
            # additivity: the sum of the in-context damages of the moves this allocation makes (3->2 and 3->4 only)
            pred = sum(moves[(k, l, bits[l])]["heldout"] for k, bits in (("w", wb), ("a", ab)) for l in free
                       if bits[l] in (2, 4))
            off = sum(1 for k, bits in (("w", wb), ("a", ab)) for l in free if bits[l] not in (2, 3, 4))
            scored[name] = {**r, "kl_heldout_vs_uniform": r["kl_heldout"] - b0["kl_heldout"],
                            "sum_of_move_damages": pred, "moves_outside_2_4": off,
                            "avg_weight_bits": average_bits({l: wb[l] for l in free}, sizes["w"], fixed_of["w"]),
                            "avg_act_bits": average_bits({l: ab[l] for l in free}, sizes["a"], fixed_of["a"]),
                            "weight_bits": {l: wb[l] for l in free}, "act_bits": {l: ab[l] for l in free}}
            print(f"seed {seed} {name}: KL {r['kl_heldout']:.4f} top-1 {r['top1_heldout']:.4f} "
                  f"(sum of moves {pred:+.4f}, actual {r['kl_heldout'] - b0['kl_heldout']:+.4f})",
                  file=sys.stderr, flush=True)
        seeds_out.append({"seed": seed, "baseline": b0, "share": s, "correlation": corr, "allocations": scored,
                          "moves": {f"{k}/{l}/{b}": v for (k, l, b), v in moves.items()},
                          "uniform_spend": u_spend})
        print(f"seed {seed}: correlations {corr}", file=sys.stderr, flush=True)
    emit({"benchmark": "quant_diagnose", **header(args.threads, list(range(args.seeds))), "model": str(args.model),
          "timm_name": spec.timm_name, "heldout": len(hy), "calib": args.calib, "seeds": seeds_out}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
