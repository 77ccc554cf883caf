"""A cost model file's latency predictions on a data set's held-out-shapes test kernels, in the "predictions" form
of benchmarks.costmodel's result, so that `benchmarks.costmodel_paired` can pair a model trained elsewhere (the
shipped one, by default) with a run trained on this data set, kernel for kernel.

    python -m benchmarks.costmodel_predictions --db costmodel.db --out shipped.json
    python -m benchmarks.costmodel_paired shipped.json benchmarks/results/costmodel.json
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True, help="labelled data set")
    ap.add_argument("--model", default=None, help="model file (default: the shipped one for this CPU)")
    ap.add_argument("--split-seed", type=int, default=0, help="the held-out-shapes split (default 0, as benchmarks.costmodel)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from memfit.plan.cost.evaluate_cmd import held_out

    _, _, test, _, pred = held_out(args.db, args.model, args.split_seed)
    result = {"benchmark": "costmodel_predictions", "db": args.db, "model": args.model or "shipped",
              "split_seed": args.split_seed, "test_kernels": len(test),
              "predictions": {"true": test.Y[:, 0].tolist(), "families": test.families, "seq": pred.tolist()}}
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
