"""Re-blend a trained cost model's sequence nets with new roofline-residual trees, and score it on held-out shapes.

Why: the trees read every hand-built feature (features.ALL_NAMES, which grows by appended columns), and they
train in seconds, where the nets take ~10 minutes a run on this shared 2-core machine. The nets of the model
given (`--nets-from`, default the shipped one) were trained on the same seed's train split and early-stopped
on its validation split, so refitting the trees and the blend's weight and shift on those splits leaves the
test shapes unseen, as `python -m benchmarks.costmodel` does.

    OMP_NUM_THREADS=1 python -m benchmarks.costmodel_reblend --db costmodel.db \\
        --model-out memfit/assets/costmodel/llvm_cpu_host.safetensors --out benchmarks/results/costmodel_reblend.json

`--add-nets B.safetensors` (repeatable) first joins the nets of runs from other seeds on the same split to the
model's (an ensemble; 3 + 3 nets are the recipe with `--seeds 6`), then blends again.

Prints one JSON object (validation figures of each blend weight, then on the test shapes MAPE / Spearman /
Kendall of the blend, the nets alone, the trees alone, LightGBM and the roofline, per family, against the
targets); --out also writes it and the predicted-against-measured PNG beside it.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.common import emit, header


def run(args: argparse.Namespace) -> dict:
    from memfit.plan.cost import dataset, store
    from memfit.plan.cost.evaluate import report
    from memfit.plan.cost.gbm import GBM, ResidualGBM
    from memfit.plan.cost.noise import floor
    from memfit.plan.cost.predict import load_model, vtile_rules
    from memfit.plan.cost.train import fit_blend, load, peaks_of

    bundle = load_model(args.nets_from)
    if args.add_nets:  # an ensemble: the nets of runs from other seeds on the same split (Bundle.with_nets_of)
        from memfit.plan.cost.seq import Bundle

        bundle = bundle.with_nets_of(*(Bundle.load(p) for p in args.add_nets))
    ex, meta = load(args.db, vtile_rules(bundle))  # the columns as the model's nets read them
    tr, va, te = dataset.shape_split(ex, args.seed)
    train_set, val_set, test = ex.subset(tr), ex.subset(va), ex.subset(te)
    bundle.info = dict(bundle.info)
    before = {k: bundle.info.get(k) for k in ("blend_weight", "blend_shift", "blend_val_mape")}
    by_weight = fit_blend(bundle, train_set, val_set, seed=args.seed)
    bundle.save(args.model_out)
    preds = {"seq": dataset.from_log(bundle.predict_log(test.toks, test.X))[:, 0]}
    blend, bundle.blend = bundle.blend, None  # the nets alone, then the blend back
    preds["seq_nets"] = dataset.from_log(bundle.predict_log(test.toks, test.X))[:, 0]
    bundle.blend = blend
    if bundle.blend:
        preds["trees"] = np.exp(ResidualGBM.from_json(bundle.blend).predict_log(test.X))
    preds["lightgbm"] = GBM(seed=args.seed).fit(train_set, val_set).predict(test)[:, 0]
    peaks = peaks_of(meta)
    if peaks is not None:
        preds["roofline"] = np.array([peaks.predict_us(f) for f in test.roofline_inputs])
    rep = report(preds, test.Y[:, 0], test.families)
    con = store.connect(args.db)
    noise = floor(con)
    nf = noise.get("noise_mape")
    target = max(0.10, 2 * nf) if nf is not None else 0.10
    seq = rep["seq"]["all"]
    return {"benchmark": "costmodel_reblend",
            **header(1, args.seed, iree_version=meta.get("iree_version"), host_cpu=meta.get("host_cpu"),
                     device="local-sync", target_cpu="host", label_kind=store.label_kind(con)),
            "kernels": len(ex), "split": {"train": len(tr), "validation": len(va), "test": len(te)},
            "nets_from": args.nets_from or "shipped", "add_nets": args.add_nets, "nets": len(bundle.nets),
            "model_bytes": os.path.getsize(args.model_out),
            "n_features": len(ex.X[0]), "blend_before": before,
            "validation": {"mape_by_nets_weight": by_weight,
                           **{k: bundle.info.get(k) for k in ("blend_weight", "blend_shift", "blend_val_mape",
                                                              "nets_val_mape", "trees_val_mape")}},
            "noise": noise, "shapes": rep,
            "targets": {"mape_target": target, "mape_met": seq["mape"] <= target,
                        "spearman_met": seq["spearman"] >= 0.95,
                        "beats_lightgbm": seq["mape"] < rep["lightgbm"]["all"]["mape"],
                        "beats_roofline": seq["mape"] < rep.get("roofline", {"all": {"mape": np.inf}})["all"]["mape"]},
            "predictions": {**{k: v.tolist() for k, v in preds.items()}, "true": test.Y[:, 0].tolist(),
                            "families": test.families}}


def _draw(result: dict, path) -> None:
    from memfit.plan.cost.evaluate import plot

    p = result["predictions"]
    preds = {k: np.array(v) for k, v in p.items() if k in ("seq", "lightgbm", "roofline")}
    plot(path, preds, np.array(p["true"]), p["families"],
         f"held-out shapes, {len(p['true'])} kernels; noise floor MAPE {result['noise'].get('noise_mape', 0):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--nets-from", help="model whose nets are kept (default: the shipped one)")
    ap.add_argument("--add-nets", action="append", default=[], metavar="MODEL",
                    help="also the nets of this model (trained on the same split from other seeds, e.g. "
                         "benchmarks.costmodel --seed 3 --split-seed 0): an ensemble of all, blended again")
    ap.add_argument("--model-out", required=True, help="where to save the re-blended model")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (the nets' own)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    emit(run(args), args.out, draw=_draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
