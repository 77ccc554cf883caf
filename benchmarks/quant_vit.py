"""LRP-QViT on Fashion-MNIST: top-1 of every allocator at several average-bit settings, over calibration seeds,
with clipped channel-wise or per-tensor post-LayerNorm activations; packed weight bytes and latency vs FP32.

    python -m benchmarks.quant_vit --model ~/.cache/memfit/quant/vit-fashion-mnist.safetensors --threads 2 \
        --out benchmarks/results/quant_vit.json

Every allocator goes through the same calibration, quantizers and reparameterisation (memfit.quant); only the
bits differ. Top-1 is the packed model's (weights unpacked on the fly) on the test images (--max-test for a
shorter run); weight bytes are read off the packed tensors. Latency: fp32 and packed side by side, round by
round (benchmarks.common.interleave), median ms per batch of 100 images. The machine's load averages (1/5/15 min,
as `uptime` prints them) are recorded at the start and end of the run and beside every row.

Every row keeps which test images its model got right (`correct`: the 0/1 vector as hex, decode_correct reads it),
so each allocator can be compared with `uniform` image by image on the same calibration seed ("paired" in the
JSON): the accuracy difference, McNemar's exact test on the images where the two disagree, and a paired bootstrap
95% interval over test images; and, over seeds, the mean difference with a bootstrap interval that resamples the
same images for every seed. These intervals speak for the test images drawn, given the calibration draws; the
spread over calibration seeds is a separate source of variation (the per-seed figures show it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import emit, header, interleave, paired_bootstrap, pin_threads, preset_threads

SETTINGS = {"W4A4": (4.0, 4), "W3A4": (3.0, 4), "W3A3": (3.0, 3), "W2.5A4": (2.5, 4)}
# Activation bits allocated too (--avg-act-bits): (avg weight bits, avg activation bits). The mixed allocators get
# exactly that activation budget; `uniform` puts every activation at its floor width (the fixed patch embedding's
# and head's 8-bit inputs push its average a hair over, as for weights). Not in the default --settings.
MIXED_ACT = {"W3A3mix": (3.0, 3.0), "W3A4mix": (3.0, 4.0), "W4A4mix": (4.0, 4.0)}
ALLOCATORS = ("lrp", "lrp-zplus", "sensitivity", "hessian", "context", "uniform", "random")


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them (the machine is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def encode_correct(correct) -> str:
    """A 0/1 vector (one entry a test image) as hex, 8 images a byte, first image in the top bit."""
    import numpy as np

    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def decode_correct(hexstr: str, n: int):
    """The inverse of encode_correct for n images: a bool numpy array."""
    import numpy as np

    return np.unpackbits(np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8))[:n].astype(bool)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b images right only under one model, c only under the other; under the
    null each such discordant image is a fair coin, so p = P(a Binomial(b+c, 1/2) is at least as far from
    (b+c)/2 as b is). scipy's binomtest where it is installed (it is in the project's venv), else the same sum
    written out with exact integers."""
    n = b + c
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:  # pragma: no cover - the fallback; its answer is the same (the test checks both)
        return mcnemar_exact_sum(b, c)
    return float(binomtest(min(b, c), n, 0.5).pvalue)


def mcnemar_exact_sum(b: int, c: int) -> float:
    """mcnemar_exact without scipy: 2 * P(X <= min(b, c)) for X ~ Binomial(b+c, 1/2), capped at 1."""
    from math import comb

    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_summary(rows: list[dict], reference: str = "uniform", n_boot: int = 10000) -> dict:
    """Each allocator against `reference` image by image, per setting, mode and calibration seed (rows with
    `correct`, `n_test`, `seed`, `setting`, `allocator`, `channelwise`): difference in top-1 (allocator minus
    reference), McNemar's exact p, a paired bootstrap 95% interval; and over the seeds both share, the mean
    difference with a bootstrap interval resampling the same images for every seed."""
    import numpy as np

    def key(r, a):
        return f"{r['setting']}/{a}/{'channelwise' if r['channelwise'] else 'per-tensor'}"

    ref = {(key(r, reference), r["seed"]): r for r in rows if r["allocator"] == reference and "correct" in r}
    out: dict[str, dict] = {}
    for r in rows:
        if r["allocator"] == reference or "correct" not in r:
            continue
        u = ref.get((key(r, reference), r["seed"]))
        if u is None:
            continue
        a_ok, u_ok = decode_correct(r["correct"], r["n_test"]), decode_correct(u["correct"], u["n_test"])
        b = int((u_ok & ~a_ok).sum())  # reference right, allocator wrong
        c = int((a_ok & ~u_ok).sum())  # allocator right, reference wrong
        d = a_ok.astype(np.int8) - u_ok.astype(np.int8)
        lo, hi = paired_bootstrap(d, n_boot, seed=r["seed"])
        entry = out.setdefault(key(r, r["allocator"]), {"against": reference, "per_seed": [], "_d": []})
        entry["per_seed"].append({"seed": r["seed"], "diff": float(d.mean()), "ci95": [lo, hi],
                                  "only_reference_right": b, "only_allocator_right": c,
                                  "mcnemar_p": mcnemar_exact(b, c)})
        entry["_d"].append(d)
    for entry in out.values():
        d = np.stack(entry.pop("_d"), axis=1)  # images x seeds
        lo, hi = paired_bootstrap(d, n_boot, seed=0)
        entry["over_seeds"] = {"seeds": d.shape[1], "mean_diff": float(d.mean()), "ci95": [lo, hi],
                               "seeds_ahead": sum(s["diff"] > 0 for s in entry["per_seed"]),
                               "seeds_ahead_p_below_0.05": sum(s["diff"] > 0 and s["mcnemar_p"] < 0.05
                                                               for s in entry["per_seed"]),
                               "seeds_behind_p_below_0.05": sum(s["diff"] < 0 and s["mcnemar_p"] < 0.05
                                                                for s in entry["per_seed"])}
    return out


def paired_sections(rows: list[dict], n_boot: int = 10000) -> dict:
    """The result's paired comparisons: "paired", every allocator against `uniform`; and, where the run has
    `random` rows, "paired_vs_random", every other allocator against `random` (the issue's second reference, and
    the one that spends the same bits as the mixed allocators at W2.5, where `uniform` cannot)."""
    out = {"paired": paired_summary(rows, "uniform", n_boot)}
    if any(r["allocator"] == "random" for r in rows):
        out["paired_vs_random"] = paired_summary([r for r in rows if r["allocator"] != "uniform"], "random", n_boot)
    return out


def correct_per_image(model, x, y, batch_size: int = 500):
    """Which of the images x (N, C, H, W) `model` (eval mode) labels right: a bool numpy array of N; its mean is
    memfit.quant.train.evaluate's top-1."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]
                          for i in range(0, len(y), batch_size)]).numpy()


def budget(allocator: str, avg_bits: float, u_budget: float, equal_spend: bool) -> float:
    """The average weight bits `allocator` may spend at a setting of `avg_bits`, `u_budget` being what `uniform`
    spends there (its body at the floor width, the 8-bit fixed layers counted). `uniform` always gets u_budget;
    with `equal_spend` the others get it too, where it is uniform's body at the setting's own width (W3, W4). At a
    setting between widths (W2.5) uniform's 2-bit body would leave the others nothing to choose (every body layer
    at 2 bits), so they all get the setting's average there, the same for every allocator but `uniform`, which
    cannot spend it (its row's avg_weight_bits says what it spent)."""
    from memfit.quant.allocators import floor_width

    if allocator == "uniform" or (equal_spend and floor_width(avg_bits) == avg_bits):
        return u_budget
    return avg_bits


def main() -> int:
    preset_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint from `memfit quant train-vit` (required unless --repair)")
    ap.add_argument("--settings", default="W4A4,W3A4,W3A3,W2.5A4", help=f"comma-separated of {', '.join([*SETTINGS, *MIXED_ACT])}")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--seeds", type=int, default=3, help="calibration seeds (the random allocator's too)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--max-test", type=int, default=None, help="first this many test images (default: all 10k)")
    ap.add_argument("--no-per-tensor", action="store_true", help="skip the per-tensor post-LayerNorm comparison")
    ap.add_argument("--equal-spend", action="store_true",
                    help="give every allocator uniform's spend (its body at the floor width, the 8-bit fixed layers "
                         "counted), weights and allocated activations alike, instead of the setting's average; at a "
                         "setting between widths (W2.5) every allocator but uniform gets the setting's average")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here (and a PNG beside it)")
    ap.add_argument("--repair", metavar="JSON",
                    help="recompute the paired comparisons (with uniform, and with random) of a result this script "
                         "wrote, from its per-image records, and write them back into it; nothing is rerun")
    args = ap.parse_args()
    if args.repair:
        path = Path(args.repair)
        result = json.loads(path.read_text())
        if not any("correct" in r for r in result.get("runs", [])):
            ap.error(f"{path} has no per-image records (written before they were kept): nothing to pair; rerun it")
        result.update(paired_sections(result["runs"]))
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("paired", "paired_vs_random") if k in result}), flush=True)
        return 0
    if not args.model:
        ap.error("--model is required (unless --repair)")
    pin_threads(args.threads)
    load_start = load_average()
    import torch

    from memfit.quant.allocators import allocate_bits, uniform_budget
    from memfit.quant.checkpoint import load_checkpoint
    from memfit.quant.export import to_packed, weight_bytes
    from memfit.quant.lrp import quantizable_layers
    from memfit.quant.qmodel import QuantConfig, quantize_model
    from memfit.quant.train import evaluate
    from memfit.train.local.data import load_fashion_mnist

    model, spec, info = load_checkpoint(args.model)
    data = load_fashion_mnist()
    x_test, y_test = data.x_test[:args.max_test], data.y_test[:args.max_test]
    fp_top1 = evaluate(model, x_test, y_test)
    fp_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantizable_layers(model).values())
    modes = [True] if args.no_per_tensor else [True, False]
    rows = []
    caches: dict[int, dict] = {}
    first_seconds: dict[tuple[str, int], float] = {}
    for setting in args.settings.split(","):
        if setting in MIXED_ACT:
            avg_bits, avg_act = MIXED_ACT[setting]
        else:
            (avg_bits, act_bits), avg_act = SETTINGS[setting], None
        # uniform gets the budget that puts its body at floor(avg_bits) bits, a hair over the others' at whole
        # widths (budget() says what --equal-spend changes, and what it cannot at W2.5)
        u_budget = uniform_budget(model, avg_bits)
        runs = [(a, budget(a, avg_bits, u_budget, args.equal_spend)) for a in args.allocators.split(",")]
        for allocator, spend in runs:
            for seed in range(args.seeds):
                idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:args.calib]
                cx, cy = data.x_train[idx], data.y_train[idx]
                for channelwise in modes:
                    # costs computed once per calibration set and reused at every setting; the time recorded
                    # is each allocator's first (uncached) allocation on that set. The costs are taken on the
                    # model as it will be quantized (folded channel-wise ranges or not), so each mode has its own.
                    acts = ({"act_bits": act_bits} if avg_act is None else {"act_bits": int(avg_act)}
                            if allocator == "uniform" else {"avg_act_bits": avg_act})
                    if args.equal_spend and "avg_act_bits" in acts:  # uniform's activation spend (8-bit inputs counted)
                        acts["avg_act_bits"] = allocate_bits(model, "uniform", u_budget, cx, cy, act_bits=int(avg_act),
                                                             cache=caches.setdefault(seed, {}),
                                                             channelwise=channelwise).avg_act_bits
                    alloc = allocate_bits(model, allocator, spend, cx, cy, **acts, seed=seed,
                                          cache=caches.setdefault(seed, {}), channelwise=channelwise)
                    first_seconds.setdefault((allocator, seed, channelwise), alloc.seconds)
                    packed = to_packed(quantize_model(model, cx, QuantConfig(alloc.weight_bits, alloc.act_bits,
                                                                             channelwise)))
                    ok = correct_per_image(packed, x_test, y_test)
                    row = {"setting": setting, "allocator": allocator, "budget": spend, "seed": seed,
                           "channelwise": channelwise,
                           "top1": float(ok.mean()), "avg_weight_bits": alloc.avg_weight_bits,
                           "avg_act_bits": alloc.avg_act_bits, "weight_bytes": weight_bytes(packed),
                           "allocation_seconds": first_seconds[(allocator, seed, channelwise)],
                           "bits_per_layer": alloc.weight_bits, "act_bits_per_layer": alloc.act_bits,
                           "load_average": load_average(), "n_test": len(ok), "correct": encode_correct(ok)}
                    rows.append(row)
                    print(f"{setting} {allocator} seed {seed} {'chan' if channelwise else 'tensor'}: "
                          f"top-1 {row['top1']:.4f} (fp {fp_top1:.4f}) W{alloc.avg_weight_bits:.2f}"
                          f"A{alloc.avg_act_bits:.2f}", file=sys.stderr, flush=True)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = f"{r['setting']}/{r['allocator']}/{'channelwise' if r['channelwise'] else 'per-tensor'}"
        groups.setdefault(key, []).append(r)
    summary = {}
    for k, rs in groups.items():
        v = [r["top1"] for r in rs]
        summary[k] = {"mean": statistics.mean(v), "median": statistics.median(v), "min": min(v), "max": max(v),
                      "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                      "avg_weight_bits": statistics.mean(r["avg_weight_bits"] for r in rs),
                      "avg_act_bits": statistics.mean(r["avg_act_bits"] for r in rs),
                      "weight_bytes": statistics.mean(r["weight_bytes"] for r in rs),
                      "allocation_seconds": statistics.median(r["allocation_seconds"] for r in rs)}
    paired = paired_sections(rows)
    for k, e in [*paired["paired"].items(), *paired.get("paired_vs_random", {}).items()]:
        o = e["over_seeds"]
        print(f"{k} - {e['against']}: {o['mean_diff'] * 100:+.2f} points over {o['seeds']} seeds "
              f"(95% CI over images {o['ci95'][0] * 100:+.2f} to {o['ci95'][1] * 100:+.2f}); McNemar p per seed "
              + ", ".join(f"{s['mcnemar_p']:.3g}" for s in e["per_seed"]), file=sys.stderr, flush=True)
    # latency: fp32 vs the packed W4A4 uniform model, side by side
    layers = quantizable_layers(model)
    packed = to_packed(quantize_model(model, data.x_train[:args.calib],
                                      QuantConfig({n: 4 for n in layers}, {n: 4 for n in layers})))
    batch = x_test[:100]
    with torch.no_grad():
        times = interleave({"fp32": lambda: model(batch), "packed_w4a4": lambda: packed(batch)}, reps=7)
    result = {
        "benchmark": "quant_vit", **header(args.threads, list(range(args.seeds))),
        "model": str(args.model), "timm_name": spec.timm_name, "kwargs": spec.kwargs, "fp_top1": fp_top1,
        "fp_weight_bytes": fp_bytes, "test_images": len(y_test), "calib": args.calib, "summary": summary,
        **paired,
        "equal_spend": args.equal_spend, "load_average_start": load_start, "load_average_end": load_average(),
        "latency_ms_batch100": {k: statistics.median(v) * 1e3 for k, v in times.items()}, "runs": rows,
    }
    emit(result, args.out, plot)
    return 0


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    settings = list(dict.fromkeys(k.split("/")[0] for k in summary))
    allocators = list(dict.fromkeys(k.split("/")[1] for k in summary))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(allocators)
    for i, a in enumerate(allocators):
        keys = [f"{s}/{a}/channelwise" for s in settings]
        means = [summary[k]["mean"] if k in summary else 0 for k in keys]
        err = [[summary[k]["mean"] - summary[k]["min"] if k in summary else 0 for k in keys],
               [summary[k]["max"] - summary[k]["mean"] if k in summary else 0 for k in keys]]
        ax.bar([j + i * width for j in range(len(settings))], means, width, yerr=err, label=a, capsize=2)
    ax.axhline(result["fp_top1"], color="k", linestyle="--", label="fp32")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
    ax.set_ylabel("top-1 (min-max over seeds)")
    lo = min(v["min"] for v in summary.values())
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend(fontsize=7)
    # two lines: a long timm name (DeiT's) ran past the figure's edge on one
    ax.set_title(f"{result['timm_name']} on Fashion-MNIST\nclipped channel-wise post-LN activations", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
