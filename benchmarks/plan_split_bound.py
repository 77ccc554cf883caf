"""The split bound (memfit.plan.bound_split) on the edge suite's cases, beside the plans of a plan_traffic edge run.

A lower bound over all orders holds for every plan, so it can be computed apart from the plans: this reads an
edge-suite result (benchmarks/plan_traffic.py --suite edge), rebuilds each case's graph (int8, weights streamed,
tiled for its scratchpad), runs the split bound at each piece size, and reports the largest proven bound, the
planner's own all-orders bound beside it, and the most any plan can save against the best baseline
(1 - bound / best baseline). A bound above a plan in the file is an error (BoundViolationError), never clamped.

    OMP_NUM_THREADS=1 python -m benchmarks.plan_split_bound --time-limit 75 --piece-ops 12 --workers 2 \
        --out benchmarks/results/plan_split_bound_edge.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import emit, header, pin_threads
from benchmarks.plan_traffic import EDGE_MODELS


def case_bound(g, cap: int, case: dict, piece_sizes: list[int], time_limit: float, workers: int) -> dict:
    from memfit.plan.bound_split import split_bound
    from memfit.plan.errors import BoundViolationError
    from memfit.plan.tiling import tile_graph

    tg, _ = tile_graph(g, cap)
    assert len(tg.ops) == case["ops"], "the tiled graph differs from the one the plan was made for"
    runs = {}
    for k in piece_sizes:
        sb = split_bound(tg, cap, k, time_limit / len(piece_sizes), workers)
        if sb.bytes > case["non_compulsory_bytes"]:  # a valid plan moves less than the "bound": a bug
            raise BoundViolationError(f"split bound ({k}-op pieces)", sb.bytes, case["non_compulsory_bytes"])
        runs[str(k)] = {"bytes": sb.bytes, "status": sb.status, "time_s": round(sb.time_s, 2),
                        "pieces": len(sb.pieces), "pieces_proven": sum(p["status"] == "optimal" for p in sb.pieces)}
    split = max(r["bytes"] for r in runs.values())
    old = case["bound_bytes"] or 0
    best = case["best_baseline_bytes"]
    bound = max(old, split)
    return {"scratchpad_bytes": cap, "ops": len(tg.ops), "best_baseline_bytes": best,
            "non_compulsory_bytes": case["non_compulsory_bytes"], "planner_bound_bytes": old,
            "split_bound_bytes": split, "split_bound_runs": runs, "bound_bytes": bound,
            "reduction_vs_best_baseline": case["reduction_vs_best_baseline"],
            "max_possible_reduction_before": None if not best else round(1 - old / best, 4),
            "max_possible_reduction": None if not best else round(1 - bound / best, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge", default="benchmarks/results/plan_traffic_edge.json", help="an edge-suite result")
    ap.add_argument("--models", default="", help="comma-separated model names (default: every model in --edge)")
    ap.add_argument("--piece-ops", default="12", help="piece sizes tried (the largest proven bound is kept)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per case, shared by the piece sizes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    pin_threads(1)
    from memfit.plan.analysis import without_weights
    from memfit.plan.graph_cache import cached_graph

    edge = json.load(open(args.edge))
    specs = {s.split(":")[0]: s for s in EDGE_MODELS}
    wanted = [m for m in args.models.split(",") if m] or [r["model"] for r in edge["results"]]
    load0 = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for r in edge["results"]:
        if r["model"] not in wanted or "cases" not in r:
            continue
        name, batch, *shape = specs[r["model"]].split(":")
        g = without_weights(cached_graph(name, int(batch), "int8", tuple(int(x) for x in shape[0].split(","))
                                         if shape else None))
        for case in r["cases"]:
            t0 = time.perf_counter()
            c = {"model": name, "batch": int(batch), **case_bound(g, case["scratchpad_bytes"], case,
                                                                  [int(k) for k in args.piece_ops.split(",")],
                                                                  args.time_limit, args.workers)}
            c["time_s"] = round(time.perf_counter() - t0, 1)
            cases.append(c)
            print(f"  {name:16s} {c['scratchpad_bytes'] >> 10:>5d} KiB plan={c['non_compulsory_bytes']} bound "
                  f"{c['planner_bound_bytes']} -> {c['bound_bytes']} cap {c['max_possible_reduction_before']} -> "
                  f"{c['max_possible_reduction']} ({c['time_s']} s)", file=sys.stderr, flush=True)
    caps = [c["max_possible_reduction"] for c in cases if c["max_possible_reduction"] is not None]
    before = [c["max_possible_reduction_before"] for c in cases if c["max_possible_reduction_before"] is not None]
    summary = {"cases": len(cases), "mean_max_possible_reduction_before": round(sum(before) / len(before), 4)
               if before else None, "mean_max_possible_reduction": round(sum(caps) / len(caps), 4) if caps else None,
               "cases_below_85_before": sum(x < 0.85 for x in before), "cases_below_85": sum(x < 0.85 for x in caps),
               "cases_split_bound_largest": sum(c["split_bound_bytes"] > c["planner_bound_bytes"] for c in cases)}
    report = {"benchmark": "plan_split_bound", "suite": "edge", "plans_from": args.edge,
              "machine": {**header(1), "cpus": os.cpu_count(), "cpsat_workers": args.workers,
                          "load_average_start": load0, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
              "config": vars(args), "summary": summary, "cases": cases}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
