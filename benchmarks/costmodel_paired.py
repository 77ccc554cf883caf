"""Two held-out-shapes runs of the cost model compared on the same test kernels: the difference of their
latency MAPE and a paired bootstrap over the kernels (95% interval), overall and per family.

    python -m benchmarks.costmodel_paired benchmarks/results/costmodel.json new.json [--model seq] [--out x.json]
    python -m benchmarks.costmodel_paired a0.json b0.json --pair a1.json b1.json [--pair ...]   # over seeds

Both files are `python -m benchmarks.costmodel` results of the same labels and split seed (their measured
latencies must agree kernel by kernel); `--model` names the prediction compared (default "seq", the blend).
With `--pair`, each further pair (e.g. both runs again from other training seeds, `--seed 3 --split-seed 0`)
must be of the same test kernels too: each kernel's difference is then the mean of its difference in every
pair, so the interval is over kernels with the training seeds' spread averaged in; each pair's own figures are
under "pairs".
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import paired_bootstrap


def paired(a: np.ndarray, b: np.ndarray, true: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """MAPE of predictions a and b against true, b - a in points, and its bootstrap 95% interval."""
    ea, eb = np.abs(a / true - 1), np.abs(b / true - 1)
    lo, hi = paired_bootstrap((eb - ea) * 100, n_boot, seed)
    return {"n": int(len(true)), "mape_a": float(ea.mean()), "mape_b": float(eb.mean()),
            "diff_points": float((eb - ea).mean() * 100), "ci95_points": [lo, hi]}


def paired_over(As: list[np.ndarray], Bs: list[np.ndarray], true: np.ndarray, n_boot: int = 10000,
                seed: int = 0) -> dict:
    """paired() over several pairs of runs on the same kernels: MAPEs averaged over the pairs, and the bootstrap
    over kernels of each kernel's b - a averaged over the pairs."""
    ea = np.mean([np.abs(a / true - 1) for a in As], axis=0)
    eb = np.mean([np.abs(b / true - 1) for b in Bs], axis=0)
    lo, hi = paired_bootstrap((eb - ea) * 100, n_boot, seed)
    return {"n": int(len(true)), "pairs": len(As), "mape_a": float(ea.mean()), "mape_b": float(eb.mean()),
            "diff_points": float((eb - ea).mean() * 100), "ci95_points": [lo, hi]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="the reference run (e.g. the shipped model's)")
    ap.add_argument("b", help="the run compared with it")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="a further pair of runs (other training seeds) of the same test kernels")
    ap.add_argument("--model", default="seq")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    pairs = [(args.a, args.b), *[tuple(p) for p in args.pair]]
    preds = [tuple(json.load(open(p))["predictions"] for p in pair) for pair in pairs]
    true = np.array(preds[0][0]["true"])
    for pa, pb in preds:
        for p in (pa, pb):
            if len(true) != len(p["true"]) or not np.allclose(true, p["true"]):
                print("the runs were not measured on the same test kernels", file=sys.stderr)
                return 2
    fam = np.array(preds[0][0]["families"])
    As = [np.array(pa[args.model]) for pa, _ in preds]
    Bs = [np.array(pb[args.model]) for _, pb in preds]
    # "benchmark" names the script (tests/benchmarks/test_package reads it); then the inputs, then the figures
    out = {"benchmark": "costmodel_paired", "a": args.a, "b": args.b, "model": args.model, "n_boot": 10000, "seed": 0}
    if len(pairs) == 1:
        out["all"] = paired(As[0], Bs[0], true)
        for f in sorted(set(fam)):
            m = fam == f
            out[f] = paired(As[0][m], Bs[0][m], true[m])
    else:
        out["pair_files"] = [list(p) for p in pairs]
        out["all"] = paired_over(As, Bs, true)
        for f in sorted(set(fam)):
            m = fam == f
            out[f] = paired_over([a[m] for a in As], [b[m] for b in Bs], true[m])
        out["pairs"] = [{"a": pa_, "b": pb_, "all": paired(a, b, true)} for (pa_, pb_), a, b in zip(pairs, As, Bs)]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
