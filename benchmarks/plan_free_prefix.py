"""One long whole-graph solve with the first steps of the best seed's order free (memfit.plan.whole), on edge-suite
cases: does a plan moving less than the planner's exist? It answers the question the bounds leave open where they
prove 0 (NASNet-A and PNASNet-5 at 4 MiB): a plan with no non-compulsory traffic is optimal, whatever found it.

The graph is the edge suite's (int8, weights streamed, tiled for the scratchpad; benchmarks/plan_traffic.py
--suite edge). The best seed (memfit.plan.planner.seed_plans) is re-solved with steps 0..N-1 of its order free
and the addresses and spills of every tensor used within 48 steps of them re-decided, asked for a plan moving
less than the seed, for --time-limit seconds (wall time); the plan found is checked by memfit.plan.validate.

    OMP_NUM_THREADS=1 python -m benchmarks.plan_free_prefix --cases nasnetalarge:4MiB,pnasnet5large:4MiB \
        --free-steps 72 --time-limit 60 --out benchmarks/results/plan_free_prefix_4mib.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from benchmarks.common import emit, header, pin_threads
from benchmarks.plan_traffic import EDGE_MODELS

if TYPE_CHECKING:
    from memfit.plan.plan_format import Graph


def free_prefix(g: Graph, cap: int, steps: int, time_limit: float, workers: int) -> dict:
    """The best seed of the tiled graph, then the whole model with its first `steps` steps free."""
    from memfit.plan.plan_format import Plan
    from memfit.plan.planner import seed_plans
    from memfit.plan.tiling import tile_graph
    from memfit.plan.validate import validate
    from memfit.plan.whole import WholeConfig, solve_whole
    from memfit.plan.whole_search import far_tensors

    tg, _ = tile_graph(g, cap)
    seed = seed_plans(tg, cap)[0]
    nc = seed.traffic["non_compulsory_bytes"]
    r = (0, min(steps, len(tg.ops)))
    res = solve_whole(tg, cap, seed.order, WholeConfig(time_limit, workers, free_range=r), hint=seed.placements,
                      below_bytes=nc, frozen=far_tensors(tg, seed.order, r, 48))
    out = {"scratchpad_bytes": cap, "ops": len(tg.ops), "seed": seed.planner, "seed_non_compulsory_bytes": nc,
           "free_steps": list(r), "status": res.status, "time_s": round(res.time_s, 1),
           "improvements": [{"s": s, "bytes": b} for s, b in res.solutions]}
    if res.status in ("optimal", "feasible"):
        plan = Plan(tg, cap, res.order, res.placements, "whole-free-prefix")
        out["traffic"] = validate(plan)  # raises if the plan breaks a rule
        out["non_compulsory_bytes"] = out["traffic"]["non_compulsory_bytes"]
        out["proven_optimal"] = out["non_compulsory_bytes"] == 0  # nothing moves less than nothing
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="nasnetalarge:4MiB,pnasnet5large:4MiB", help="MODEL:SIZE,...")
    ap.add_argument("--free-steps", type=int, default=72)
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per case (wall time)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    pin_threads(1)
    from memfit.plan.analysis import without_weights
    from memfit.plan.graph_cache import cached_graph
    from memfit.plan.sizes import parse_size

    specs = {s.split(":")[0]: s for s in EDGE_MODELS}
    load0 = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for case in args.cases.split(","):
        model, size = case.split(":")
        name, batch, *shape = specs[model].split(":")
        g = without_weights(cached_graph(name, int(batch), "int8", tuple(int(x) for x in shape[0].split(","))
                                         if shape else None))
        t0 = time.perf_counter()
        c = {"model": name, "batch": int(batch), **free_prefix(g, parse_size(size), args.free_steps,
                                                               args.time_limit, args.workers)}
        c["wall_s"] = round(time.perf_counter() - t0, 1)
        cases.append(c)
        print(f"  {name:16s} {size}: seed {c['seed']} {c['seed_non_compulsory_bytes']} -> "
              f"{c.get('non_compulsory_bytes')} ({c['status']}, {c['time_s']} s)", file=sys.stderr, flush=True)
    report = {"benchmark": "plan_free_prefix", "suite": "edge",
              "machine": {**header(1), "cpus": os.cpu_count(), "cpsat_workers": args.workers,
                          "load_average_start": load0, "load_average_end": [round(x, 2) for x in os.getloadavg()],
                          "note": "shared machine; the solver limit is wall time"},
              "config": vars(args), "cases": cases}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
