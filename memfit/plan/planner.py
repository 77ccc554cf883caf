"""One entry point for every planner: `make_plan(graph, scratchpad, planner=...)` -> validated Plan."""
from __future__ import annotations

import time
from dataclasses import dataclass

from memfit.plan.analysis import check_feasible
from memfit.plan.baselines import BASELINES, plan_baseline
from memfit.plan.errors import PlanError
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.heuristic import HeuristicConfig, merge_adjacent, plan_segments
from memfit.plan.plan_format import Graph, Plan, SolverInfo
from memfit.plan.validate import validate

PLANNERS = ("auto", "exact", "heuristic", *BASELINES)


@dataclass
class PlanOptions:
    planner: str = "auto"  # auto: exact when the graph has <= exact_max_ops ops, else heuristic
    time_limit_s: float = 30.0
    num_workers: int = 2
    exact_max_ops: int = 60
    free_order: bool | None = None  # exact: None = free when <= 40 ops; heuristic: None = free in segments
    max_segment_ops: int = 16
    seed: int = 0


def best_baseline(g: Graph, scratchpad_bytes: int) -> tuple[Plan, dict[str, Plan]]:
    """All baselines; the one with the least non-compulsory traffic first."""
    plans = {name: finish(plan_baseline(g, scratchpad_bytes, cfg)) for name, cfg in BASELINES.items()}
    best = min(plans.values(), key=lambda p: (p.traffic["non_compulsory_bytes"], p.planner))
    return best, plans


def finish(plan: Plan) -> Plan:
    """Validate (every planner's output must pass) and attach the traffic breakdown."""
    plan.traffic = validate(plan)
    s = plan.solver
    if s is not None:
        nc = plan.traffic["non_compulsory_bytes"]
        s.objective_bytes = nc
        if s.bound_bytes is not None:
            s.bound_bytes = min(s.bound_bytes, nc)
            s.gap = 0.0 if nc == 0 else (nc - s.bound_bytes) / nc
    return plan


def plan_exact(g: Graph, scratchpad_bytes: int, opts: PlanOptions) -> Plan:
    t0 = time.perf_counter()
    base, _ = best_baseline(g, scratchpad_bytes)
    cfg = ExactConfig(opts.time_limit_s, opts.num_workers, opts.free_order, seed=opts.seed)
    free = cfg.free_order if cfg.free_order is not None else len(g.ops) <= cfg.max_free_order_ops
    seg = Segment(base.order, free_order=free)
    res = solve_segment(g, scratchpad_bytes, seg, cfg, hint=(base.order, base.placements))
    details = {"free_order": free, "seed_planner": base.planner, "seed_non_compulsory_bytes":
               base.traffic["non_compulsory_bytes"], "model_objective_bytes": res.objective_bytes}
    if res.status == "none":  # CP-SAT found nothing in time: return the seed, say so
        info = SolverInfo("fallback", time.perf_counter() - t0, bound_bytes=res.bound_bytes, details=details)
        return finish(Plan(g, scratchpad_bytes, base.order, base.placements, "exact", info))
    info = SolverInfo(res.status, time.perf_counter() - t0, bound_bytes=res.bound_bytes, details=details)
    plan = finish(Plan(g, scratchpad_bytes, res.order, merge_adjacent(res.placements), "exact", info))
    if plan.traffic["non_compulsory_bytes"] > base.traffic["non_compulsory_bytes"]:  # cannot happen when optimal
        plan.order, plan.placements, plan.solver.status = base.order, base.placements, "fallback"
        plan = finish(plan)
    return plan


def plan_heuristic(g: Graph, scratchpad_bytes: int, opts: PlanOptions, progress=None) -> Plan:
    t0 = time.perf_counter()
    base, _ = best_baseline(g, scratchpad_bytes)
    cfg = HeuristicConfig(max(1.0, opts.time_limit_s - (time.perf_counter() - t0)), opts.max_segment_ops,
                          free_order=opts.free_order is not False, num_workers=opts.num_workers, seed=opts.seed)
    order, placements, stats = plan_segments(g, scratchpad_bytes, base.order, cfg, progress)
    stats.update(seed_planner=base.planner, seed_non_compulsory_bytes=base.traffic["non_compulsory_bytes"])
    info = SolverInfo("heuristic", 0.0, details=stats)
    plan = finish(Plan(g, scratchpad_bytes, order, placements, "heuristic", info))
    if plan.traffic["non_compulsory_bytes"] > base.traffic["non_compulsory_bytes"]:
        plan.order, plan.placements = base.order, base.placements
        stats["used_seed_instead"] = True
        plan = finish(plan)
    plan.solver.time_s = time.perf_counter() - t0
    return plan


def make_plan(g: Graph, scratchpad_bytes: int, opts: PlanOptions | None = None, progress=None) -> Plan:
    opts = opts or PlanOptions()
    check_feasible(g, scratchpad_bytes)
    name = opts.planner
    if name == "auto":
        name = "exact" if len(g.ops) <= opts.exact_max_ops else "heuristic"
    if name == "exact":
        return plan_exact(g, scratchpad_bytes, opts)
    if name == "heuristic":
        return plan_heuristic(g, scratchpad_bytes, opts, progress)
    if name in BASELINES:
        return finish(plan_baseline(g, scratchpad_bytes, BASELINES[name]))
    raise PlanError(f"unknown planner {opts.planner!r}; choose one of {', '.join(PLANNERS)}")
