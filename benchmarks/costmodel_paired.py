"""Two held-out-shapes runs of the cost model compared on the same test kernels: the difference of their
latency MAPE and a paired bootstrap over the kernels (95% interval), overall and per family.

    python -m benchmarks.costmodel_paired benchmarks/results/costmodel.json new.json [--model seq] [--out x.json]

Both files are `python -m benchmarks.costmodel` results of the same labels and split seed (their measured
latencies must agree kernel by kernel); `--model` names the prediction compared (default "seq", the blend).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="the reference run (e.g. the shipped model's)")
    ap.add_argument("b", help="the run compared with it")
    ap.add_argument("--model", default="seq")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    pa, pb = (json.load(open(p))["predictions"] for p in (args.a, args.b))
    true = np.array(pa["true"])
    if len(true) != len(pb["true"]) or not np.allclose(true, pb["true"]):
        print("the two runs were not measured on the same test kernels", file=sys.stderr)
        return 2
    a, b, fam = np.array(pa[args.model]), np.array(pb[args.model]), np.array(pa["families"])
    # "benchmark" names the script (tests/benchmarks/test_package reads it); then the inputs, then the figures
    out = {"benchmark": "costmodel_paired", "a": args.a, "b": args.b, "model": args.model, "n_boot": 10000, "seed": 0,
           "all": paired(a, b, true)}
    for f in sorted(set(fam)):
        m = fam == f
        out[f] = paired(a[m], b[m], true[m])
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
