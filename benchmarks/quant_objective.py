"""Issue 20: is it lrp-zplus's knapsack objective, not its relevance scores, that keeps it at the uniform body at
W3? The same scores under other objectives, scored on held-out TRAINING images; `--eval test` scores the same
allocations on the first test images, only to report what the held-out run chose.

    OMP_NUM_THREADS=1 python -m benchmarks.quant_objective --model vit.safetensors --threads 1 \
        --out benchmarks/results/quant_objective_vit3.json

Cost of giving free layer l b bits, for each objective (s_l: lrp-zplus's relevance share, the same numbers the
allocator uses; d: relative weight distortion ||Q_b(W) - W||^2 / ||W||^2 of the folded weights, as now;
e: relative output distortion ||X (Q_b(W) - W)^T||^2 / ||X W^T||^2 on the layer's inputs from 64 calibration
images):
  cur      s * d             lrp-zplus as it is
  sqrt     s * sqrt(d)       relevance is linear in the activation: weigh the relative RMS error
  sq       s^2 * d           first-order propagation of the error: its variance goes as the gain squared
  out      s * e             the measured output error of the layer instead of its weight error
  outsqrt  s * sqrt(e)
  lin      s * (8 - b)       linear in bits, no distortion
  dflat    d                 no relevance (every share equal): what the scores add over the distortion alone
  eflat    e
plus `uniform` (the benchmark's budget: body at floor(avg) bits) and `random` (seeded like the calibration).
Every allocation goes through the same knapsack, quantizers and calibration (memfit.quant), activations as
`memfit quant vit` sets them (the patch embedding's and heads' inputs at 8 bits); top-1 and KL to FP32
of the simulated model on `--heldout` training images outside calibration draws 0-2 (256 images each, drawn as
benchmarks.quant_vit draws them).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

from benchmarks.common import emit, header, pin_threads, preset_threads

OBJECTIVES = ("cur", "sqrt", "sq", "out", "outsqrt", "lin", "dflat", "eflat")
SETTINGS = {"W3A4": (3.0, 4), "W3A3": (3.0, 3), "W2.5A4": (2.5, 4)}


def calibration_split(n: int, calib: int, heldout: int):
    """The calibration draws of seeds 0-2 ({seed: (calib,) indices}) and up to `heldout` training images none of
    them uses (a fixed permutation, seed 1234): what the objective and quant_diagnose score on."""
    import torch

    draws = {s: torch.randperm(n, generator=torch.Generator().manual_seed(s))[:calib] for s in range(3)}
    used = torch.zeros(n, dtype=torch.bool)
    for idx in draws.values():
        used[idx] = True
    rest = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    return draws, rest[~used[rest]][:heldout]


def main() -> int:
    preset_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint from `memfit quant train-vit`")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--eval", choices=("heldout", "test"), default="heldout",
                    help="score on held-out training images (choose by this), or on the first --heldout test "
                         "images (only to report what was chosen)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    pin_threads(args.threads)
    import torch
    import torch.nn.functional as F

    from memfit.quant.allocate import average_bits, solve_knapsack
    from memfit.quant.allocators import _FIXED_NAMES, FIXED_BITS, allocate_bits, uniform_budget
    from memfit.quant.checkpoint import load_checkpoint
    from memfit.quant.lrp import quantizable_layers
    from memfit.quant.qmodel import QuantConfig, quantize_model, record
    from memfit.quant.quantizers import BIT_CHOICES, fake_quant_weight
    from memfit.train.local.data import load_fashion_mnist

    model, spec, _ = load_checkpoint(args.model)
    data = load_fashion_mnist()
    draws, rest = calibration_split(len(data.y_train), args.calib, args.heldout)
    hx, hy = data.x_train[rest], data.y_train[rest]
    if args.eval == "test":
        hx, hy = data.x_test[:args.heldout], data.y_test[:args.heldout]

    @torch.no_grad()
    def logp_of(m):
        return torch.cat([F.log_softmax(m(hx[i:i + 500]), -1) for i in range(0, len(hx), 500)])  # (N, K)

    ref = logp_of(model.eval())
    fp_top1 = float((ref.argmax(-1) == hy).float().mean())

    def out_distortion(folded, names, x):
        layers, acts = quantizable_layers(folded), record(folded, x, names)
        out = {}
        for name in names:
            w, xin = layers[name].weight.detach(), acts[name]  # (O, I), (rows, I)
            power = float((xin @ w.T).pow(2).sum())
            out[name] = {b: float((xin @ (fake_quant_weight(w, b) - w).T).pow(2).sum()) / power for b in BIT_CHOICES}
        return out

    rows, trade = [], {}
    for seed in range(args.seeds):
        cx, cy = data.x_train[draws[seed]], data.y_train[draws[seed]]
        cache: dict = {}
        s = allocate_bits(model, "lrp-zplus", 3.0, cx, cy, act_bits=4, seed=seed, cache=cache).importance
        folded = cache[(True, "folded")]  # the copy with the clipped channel-wise ranges folded in
        layers = quantizable_layers(folded)
        free = [l for l in layers if l not in _FIXED_NAMES]
        fixed = {l: (layers[l].weight.numel(), FIXED_BITS) for l in layers if l in _FIXED_NAMES}
        sizes = {l: layers[l].weight.numel() for l in free}
        d, e = cache[(True, "w_dist")], out_distortion(folded, free, cx[:64])
        shape = {"cur": lambda l, b: s[l] * d[l][b], "sqrt": lambda l, b: s[l] * math.sqrt(d[l][b]),
                 "sq": lambda l, b: s[l] ** 2 * d[l][b], "out": lambda l, b: s[l] * e[l][b],
                 "outsqrt": lambda l, b: s[l] * math.sqrt(e[l][b]), "lin": lambda l, b: s[l] * (8 - b),
                 "dflat": lambda l, b: d[l][b], "eflat": lambda l, b: e[l][b]}
        costs = {o: {l: {b: shape[o](l, b) for b in BIT_CHOICES} for l in free} for o in args.objectives.split(",")}
        # how far apart two equal-sized layers' shares must be before 3+3 bits -> 2+4 pays (median over layers)
        trade[seed] = {"share_span": max(s.values()) / min(s.values()),
                       **{o: statistics.median((c[l][2] - c[l][3]) / max(c[l][3] - c[l][4], 1e-30) for l in free)
                          for o, c in costs.items() if o in ("cur", "sqrt", "out", "outsqrt")}}
        for setting in args.settings.split(","):
            avg, act = SETTINGS[setting]
            allocs = {o: solve_knapsack(c, sizes, avg, fixed) for o, c in costs.items()}
            allocs["uniform"] = allocate_bits(model, "uniform", uniform_budget(model, avg), cx, cy, act_bits=act,
                                              cache=cache).weight_bits
            allocs["random"] = allocate_bits(model, "random", avg, cx, cy, act_bits=act, seed=seed,
                                             cache=cache).weight_bits
            for o, wb in allocs.items():
                wb = {l: wb.get(l, FIXED_BITS) for l in layers}
                body = [wb[l] for l in free]
                # activations as allocate_bits gives them: the fixed layers' inputs at 8 bits, the rest at `act`
                acts = {l: FIXED_BITS if l in fixed else act for l in layers}
                qm = quantize_model(model, cx, QuantConfig(wb, acts, True))
                logp = logp_of(qm)
                row = {"setting": setting, "objective": o, "seed": seed,
                       "top1": float((logp.argmax(-1) == hy).float().mean()),
                       "kl": float(F.kl_div(logp, ref, log_target=True, reduction="batchmean")),
                       "avg_weight_bits": average_bits({l: wb[l] for l in free}, sizes, fixed),
                       "body_widths": {b: body.count(b) for b in BIT_CHOICES if body.count(b)}}
                rows.append(row)
                print(f"{setting} {o} seed {seed}: {args.eval} top-1 {row['top1']:.4f} KL {row['kl']:.4f} "
                      f"{row['body_widths']}", file=sys.stderr, flush=True)
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['setting']}/{r['objective']}", []).append(r)
    summary = {k: {"top1_mean": statistics.mean(r["top1"] for r in rs), "top1_min": min(r["top1"] for r in rs),
                   "top1_max": max(r["top1"] for r in rs), "kl_mean": statistics.mean(r["kl"] for r in rs),
                   "kl_min": min(r["kl"] for r in rs), "kl_max": max(r["kl"] for r in rs),
                   "avg_weight_bits": statistics.mean(r["avg_weight_bits"] for r in rs)} for k, rs in summary.items()}
    emit({"benchmark": "quant_objective", **header(args.threads, list(range(args.seeds))), "model": str(args.model),
          "timm_name": spec.timm_name, "eval": args.eval,
          "fp_top1": fp_top1, "images": len(hy), "calib": args.calib,
          "trade_ratio_needed": trade, "summary": summary, "runs": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
