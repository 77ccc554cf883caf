"""Where a cost model's held-out-shapes error comes from: its latency MAPE split by family, family x dtype,
latency band and label-noise band, the share of the summed error each holds, the tail, the error on the
training split, and the floor the label noise puts on MAPE.

    OMP_NUM_THREADS=1 python -m benchmarks.costmodel_errors --db costmodel.db \\
        [--model memfit/assets/costmodel/llvm_cpu_host.safetensors] --out benchmarks/results/costmodel_errors.json

The model must have been trained on the same seed's shape split (python -m benchmarks.costmodel does that), so
its test kernels are unseen. The noise floors come from each label's own repetitions (the CPU time of every
repetition, stored by `label`): the mean |median of 5 / truth - 1| a perfect model would still show, from the
repetitions' spread (sqrt(2/pi) x 1.2533 sd / sqrt(5), normal repetitions), and one repetition against the
median of the others. Prints one JSON object; --out also writes it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.common import emit, header

BANDS_US = (0, 10, 30, 100, 300, 1000, 3000, float("inf"))
SPREAD_BANDS = (0, 0.01, 0.03, 0.1, float("inf"))


def _part(ape: np.ndarray, mask: np.ndarray, total: float) -> dict:
    return {"n": int(mask.sum()), "mape": float(ape[mask].mean()) if mask.any() else None,
            "share": float(ape[mask].sum() / total) if mask.any() else 0.0}


def breakdown(pred: np.ndarray, true: np.ndarray, families: np.ndarray, dtypes: np.ndarray,
              spread: np.ndarray) -> dict:
    """MAPE of `pred` against `true` and where its summed absolute percentage error sits."""
    ape = np.abs(pred / true - 1)
    total = float(ape.sum())
    ratio = np.log(pred / true)
    out = {"n": int(len(true)), "mape": float(ape.mean()), "median_ape": float(np.median(ape)),
           "ape_q90": float(np.quantile(ape, 0.9)),
           "over_predicted": _part(ape, ratio > 0, total), "under_predicted": _part(ape, ratio < 0, total),
           "tail_ape_over_0.5": {**_part(ape, ape > 0.5, total), "mape_without": float(ape[ape <= 0.5].mean())},
           "families": {}, "family_dtype": {}, "latency_bands_us": {}, "spread_bands": {}}
    for f in sorted(set(families)):
        m = families == f
        out["families"][f] = {**_part(ape, m, total), "mean_log_ratio": float(ratio[m].mean()),
                              "sd_log_ratio": float(ratio[m].std())}
        for d in sorted(set(dtypes[m])):
            out["family_dtype"][f"{f}/{d}"] = _part(ape, m & (dtypes == d), total)
    for lo, hi in zip(BANDS_US[:-1], BANDS_US[1:]):
        out["latency_bands_us"][f"{lo:g}-{hi:g}"] = _part(ape, (true >= lo) & (true < hi), total)
    for lo, hi in zip(SPREAD_BANDS[:-1], SPREAD_BANDS[1:]):
        out["spread_bands"][f"{lo:g}-{hi:g}"] = _part(ape, (spread >= lo) & (spread < hi), total)
    return out


def noise_floor(reps: list[list[float]]) -> dict:
    """What the labels' own repetitions say a perfect model's MAPE would be (see the module's note)."""
    sd = np.array([np.std(r, ddof=1) / np.median(r) for r in reps if len(r) > 1])
    loo = [np.mean([abs(np.median(np.delete(r, j)) / r[j] - 1) for j in range(len(r))])
           for r in map(np.asarray, reps) if len(r) >= 3]
    spread = np.array([(max(r) - min(r)) / np.median(r) for r in reps if r])
    return {"kernels": int(len(sd)), "median_rel_sd": float(np.median(sd)),
            "median_spread": float(np.median(spread)),
            "floor_from_sd": float(np.mean(np.sqrt(2 / np.pi) * 1.2533 * sd / np.sqrt(5))),
            "one_rep_vs_median_of_others": float(np.mean(loo))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--model", default=None, help="default: the shipped model")
    ap.add_argument("--seed", type=int, default=0, help="the shape split's seed the model was trained on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from memfit.plan.cost import dataset, store
    from memfit.plan.cost.predict import load_model, vtile_rules
    from memfit.plan.cost.train import load

    bundle = load_model(args.model)
    ex, meta = load(args.db, vtile_rules(bundle))  # the columns as the model reads them
    rows = store.labelled(store.connect(args.db))
    assert [r["key"] for r in rows] == ex.keys
    reps = [r.get("cpu_reps") or [] for r in rows]
    spread = np.array([(max(r) - min(r)) / np.median(r) if r else np.nan for r in reps])
    dtypes = np.array([r["dtype"] for r in rows])
    fams = np.array(ex.families)
    pred = np.exp(bundle.predict_log(ex.toks, ex.X)[:, 0])
    true = ex.Y[:, 0]
    splits = dict(zip(("train", "validation", "test"), dataset.shape_split(ex, args.seed)))
    result = {"benchmark": "costmodel_errors",
              **header(1, args.seed, iree_version=meta.get("iree_version"), host_cpu=meta.get("host_cpu"),
                       label_kind=store.label_kind(store.connect(args.db))),
              "model": args.model or "shipped", "model_info": {k: bundle.info.get(k) for k in
                                                               ("val_kernels", "blend_val_mape", "test")},
              "splits": {name: breakdown(pred[i], true[i], fams[i], dtypes[i], spread[i])
                         for name, i in splits.items()},
              "noise_floor": {name: noise_floor([reps[j] for j in i]) for name, i in splits.items()}}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
