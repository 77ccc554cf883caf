"""One entry point for every planner: `make_plan(graph, scratchpad, planner=...)` -> validated Plan."""
from __future__ import annotations

import time
from dataclasses import replace

from memfit.plan.analysis import check_feasible
from memfit.plan.baselines import BASELINES, plan_baseline
from memfit.plan.bound import LowerBound
from memfit.plan.clock import Clock, current, use
from memfit.plan.errors import BoundViolationError, PlanError
from memfit.plan.exact import ExactConfig, Segment, SegmentResult, solve_segment
from memfit.plan.heuristic import HeuristicConfig, lns_passes, merge_adjacent, plan_passes
from memfit.plan.options import PlanOptions
from memfit.plan.orders import order_seeds
from memfit.plan.plan_format import Graph, Plan, SolverInfo
from memfit.plan.planner_bounds import all_orders_bound as _bound
from memfit.plan.planner_bounds import with_split_bound as _split
from memfit.plan.validate import validate

PLANNERS = ("auto", "whole", "exact", "heuristic", *BASELINES)


def best_baseline(g: Graph, scratchpad_bytes: int) -> tuple[Plan, dict[str, Plan]]:
    """All baselines; the one with the least non-compulsory traffic first."""
    plans = {name: finish(plan_baseline(g, scratchpad_bytes, cfg)) for name, cfg in BASELINES.items()}
    best = min(plans.values(), key=lambda p: (p.traffic["non_compulsory_bytes"], p.planner))
    return best, plans


def seed_plans(g: Graph, scratchpad_bytes: int) -> list[Plan]:
    """Every baseline and a plan on each of memfit's depth-first candidate orders (memfit.plan.orders),
    least non-compulsory traffic first (a baseline first on ties)."""
    _, bases = best_baseline(g, scratchpad_bytes)
    plans = list(bases.values()) + [finish(p) for p in order_seeds(g, scratchpad_bytes)]
    return sorted(plans, key=lambda p: (p.traffic["non_compulsory_bytes"], not p.planner.startswith("baseline")))


def best_seed(g: Graph, scratchpad_bytes: int) -> Plan:
    """The planners' starting point: the best baseline, or a plan on one of memfit's depth-first candidate
    orders where that moves less."""
    return seed_plans(g, scratchpad_bytes)[0]


def finish(plan: Plan) -> Plan:
    """Validate (every planner's output must pass) and attach the traffic breakdown."""
    plan.traffic = validate(plan)
    s = plan.solver
    if s is not None:
        nc = plan.traffic["non_compulsory_bytes"]
        s.objective_bytes = nc
        if s.bound_bytes is not None:
            if s.bound_bytes > nc:  # a proven bound above a valid plan is a bug, never something to clamp
                raise BoundViolationError(plan.planner, s.bound_bytes, nc)
            s.gap = 0.0 if nc == 0 else (nc - s.bound_bytes) / nc
    return plan


def plan_exact(g: Graph, scratchpad_bytes: int, opts: PlanOptions) -> Plan:
    t0, c0 = time.perf_counter(), current().now()  # wall time for the report, the clock's for the limits
    base = best_seed(g, scratchpad_bytes)
    lb = _bound(g, scratchpad_bytes, opts)
    cfg = ExactConfig(max(0.5, opts.time_limit_s - (current().now() - c0)), opts.num_workers,
                      opts.free_order, seed=opts.seed)
    free = cfg.free_order if cfg.free_order is not None else len(g.ops) <= cfg.max_free_order_ops
    seg = Segment(base.order, free_order=free)
    floor = lb.bytes if lb is not None else 0
    if lb is not None and base.traffic["non_compulsory_bytes"] <= floor:  # the seed meets the bound already
        res = SegmentResult(base.order, base.placements, "optimal", floor, floor, 0.0, {})
        seed_meets = True
    else:
        seed_meets = False
        res = solve_segment(g, scratchpad_bytes, seg, cfg, hint=(base.order, base.placements), floor_bytes=floor)
    details = {"free_order": free, "seed_planner": base.planner, "seed_non_compulsory_bytes":
               base.traffic["non_compulsory_bytes"], "model_objective_bytes": res.objective_bytes,
               "cpsat_bound_bytes": res.bound_bytes, "cpsat_bound_scope": "all orders" if free else "fixed order"}
    if res.status == "none":  # CP-SAT found nothing in time: return the seed, say so
        info = SolverInfo("fallback", 0.0, details=details)
        order, placements = base.order, base.placements
    else:
        info = SolverInfo(res.status, 0.0, details=details)
        order, placements = res.order, merge_adjacent(res.placements)
    plan = Plan(g, scratchpad_bytes, order, placements, "exact", info)
    plan.traffic = validate(plan)
    if plan.traffic["non_compulsory_bytes"] > base.traffic["non_compulsory_bytes"]:  # cannot happen when optimal
        plan.order, plan.placements, plan.solver.status = base.order, base.placements, "fallback"
    elif plan.traffic["non_compulsory_bytes"] == base.traffic["non_compulsory_bytes"]:
        # CP-SAT found nothing better than its seed: return the seed itself, named after it below (a proof
        # CP-SAT gave holds for it too: same traffic, and the same order when the order was fixed)
        plan.order, plan.placements = base.order, base.placements
    # a bound over all orders: CP-SAT's own when the order was free, and the capacity bound either way
    plan = _with_bound(plan, lb, res.bound_bytes if free else None)
    if not free and plan.solver.status == "optimal" and plan.solver.gap:
        plan.solver.status = "optimal-fixed-order"  # optimal for this order; another order may do better
    plan.solver.time_s = time.perf_counter() - t0
    seed_returned = seed_meets or plan.order is base.order  # met the bound already, or CP-SAT did not improve it
    details["seed_meets_bound"] = seed_meets
    return _label_seed(plan, base, seed_returned)


def plan_heuristic(g: Graph, scratchpad_bytes: int, opts: PlanOptions, progress=None) -> Plan:
    t0, c0 = time.perf_counter(), current().now()  # wall time for the report, the clock's for the limits
    base = best_seed(g, scratchpad_bytes)
    lb = _split(g, scratchpad_bytes, opts, _bound(g, scratchpad_bytes, opts), base, c0)
    seed_nc = base.traffic["non_compulsory_bytes"]
    stats: dict = {"seed_planner": base.planner, "seed_non_compulsory_bytes": seed_nc}
    if lb is not None and seed_nc <= lb.bytes:  # the seed already meets the bound: nothing to gain
        order, placements = base.order, base.placements
        stats["seed_meets_bound"] = True
    else:
        # order free inside segments for small graphs; on large ones CP-SAT rarely finds a free-order segment
        # plan in its share of the time, so segments keep the seed's order (chosen among candidate orders)
        free = opts.free_order if opts.free_order is not None else len(g.ops) <= opts.free_segments_max_ops
        cfg = HeuristicConfig(max(1.0, opts.time_limit_s - (current().now() - c0)), opts.max_segment_ops,
                              free_order=free, num_workers=opts.num_workers,
                              seed=opts.seed)
        target = lb.bytes if lb is not None else 0
        if free:  # small graphs: segments solved in turn, order free inside each
            order, placements, more = plan_passes(g, scratchpad_bytes, base.order, cfg, target, progress)
        else:  # large graphs: windows of the seed plan re-solved with its state pinned at both ends
            order, placements, more = lns_passes(g, scratchpad_bytes, base.order, base.placements, cfg, target,
                                                 progress)
        stats.update(more)
    plan = Plan(g, scratchpad_bytes, order, placements, "heuristic", SolverInfo("heuristic", 0.0, details=stats))
    plan.traffic = validate(plan)
    if not stats.get("seed_meets_bound") and plan.traffic["non_compulsory_bytes"] >= seed_nc:
        # no better than the seed: return the seed itself, named after it (issue 22: a returned seed is
        # labelled as the seed it is)
        plan.order, plan.placements = base.order, base.placements
        stats["used_seed_instead"] = True
    plan = _with_bound(plan, lb, None)
    plan.solver.time_s = time.perf_counter() - t0
    return _label_seed(plan, base, stats.get("seed_meets_bound") or stats.get("used_seed_instead"))


def plan_whole(g: Graph, scratchpad_bytes: int, opts: PlanOptions, progress=None) -> Plan:
    """The whole-graph CP-SAT model: candidate orders solved exactly, then order search (whole_search)."""
    from memfit.plan.whole_search import SearchConfig, prefix_move, search

    t0, c0 = time.perf_counter(), current().now()  # wall time for the report, the clock's for the limits
    seeds = seed_plans(g, scratchpad_bytes)
    base = seeds[0]
    lb = _split(g, scratchpad_bytes, opts, _bound(g, scratchpad_bytes, opts), base, c0)
    floor = lb.bytes if lb is not None else 0
    stats: dict = {"seed_planner": base.planner, "seed_non_compulsory_bytes": base.traffic["non_compulsory_bytes"]}
    if lb is not None and base.traffic["non_compulsory_bytes"] <= floor:  # the seed meets the bound already
        order, placements, status = base.order, base.placements, "heuristic"
        stats["seed_meets_bound"] = True
        lns_plan = start = base
    else:
        # where the seed's reloads all sit in its first steps, free everything before them at once
        left = opts.time_limit_s - (current().now() - c0)
        start, pre = prefix_move(g, scratchpad_bytes, base, min(opts.whole_prefix_share * opts.time_limit_s, left / 2),
                                 opts.num_workers, opts.seed, floor, opts.whole_prefix_max_ops)
        if pre is not None:
            stats["prefix_move"] = pre
        lns_plan = start
        order, placements, status = start.order, start.placements, "feasible"
    if not stats.get("seed_meets_bound") and start.traffic["non_compulsory_bytes"] > floor:
        # the per-step windows of the seed (heuristic.lns_passes) first: on graphs where the whole model's
        # fixed-order solve is not proven in its share (DenseNet: 2500 rectangles) they find what it misses
        remaining = opts.time_limit_s - (current().now() - c0)
        hcfg = HeuristicConfig(max(1.0, opts.whole_lns_share * remaining), opts.max_segment_ops,
                               num_workers=opts.num_workers, seed=opts.seed)
        o, pl, lns = lns_passes(g, scratchpad_bytes, start.order, start.placements, hcfg, floor, progress)
        lns_plan = Plan(g, scratchpad_bytes, o, pl, "windows")
        lns_plan.traffic = validate(lns_plan)
        stats["windows"] = {"non_compulsory_bytes": lns_plan.traffic["non_compulsory_bytes"], **lns}
        seeds = sorted([lns_plan, start, *seeds], key=lambda p: p.traffic["non_compulsory_bytes"])
        cfg = SearchConfig(max(1.0, opts.time_limit_s - (current().now() - c0)), opts.num_workers,
                           seed=opts.seed)
        order, placements, more = search(g, scratchpad_bytes, seeds, cfg, floor)
        stats.update(more)
        # optimal for its order when the last fixed-order solve proved it; the all-orders gap is set below
        status = "optimal-fixed-order" if more["final"]["status"] == "optimal" else "feasible"
    name = "whole"
    nc = validate(Plan(g, scratchpad_bytes, order, placements))["non_compulsory_bytes"]
    if not stats.get("seed_meets_bound") and start is base and lns_plan.traffic["non_compulsory_bytes"] <= nc < \
            base.traffic["non_compulsory_bytes"]:  # the whole model added nothing to the windows' plan: say so
        if order != lns_plan.order:
            status = "heuristic"  # the proof (if any) was for another order
        name, order, placements = "heuristic", lns_plan.order, lns_plan.placements
        stats["produced_by_windows"] = True
    plan = Plan(g, scratchpad_bytes, order, placements, name, SolverInfo(status, 0.0, details=stats))
    plan.traffic = validate(plan)
    if plan.traffic["non_compulsory_bytes"] >= base.traffic["non_compulsory_bytes"]:  # no better than the seed
        if plan.order != base.order:  # the proof (if any) was for another order
            plan.solver.status = "fallback" if plan.traffic["non_compulsory_bytes"] > base.traffic[
                "non_compulsory_bytes"] else "feasible"
        plan.order, plan.placements = base.order, base.placements
        stats["used_seed_instead"] = True
    plan = _with_bound(plan, lb, None)
    plan.solver.time_s = time.perf_counter() - t0
    return _label_seed(plan, base, stats.get("seed_meets_bound") or stats.get("used_seed_instead"))


def _label_seed(plan: Plan, base: Plan, returned_seed: bool) -> Plan:
    """Say which planner produced the plan: a returned seed carries the seed baseline's name."""
    plan.solver.details["requested_planner"] = plan.planner
    if returned_seed:
        plan.planner = base.planner
    plan.solver.details["produced_by"] = plan.planner
    return plan


def _with_bound(plan: Plan, lb: LowerBound | None, other_bound: int | None) -> Plan:
    """Validate, set bound_bytes to the best bound valid over all orders, and call the plan optimal when it
    meets that bound (whatever found it)."""
    s = plan.solver
    bounds = [b for b in (other_bound, lb.bytes if lb is not None else None) if b is not None]
    s.bound_bytes = max(bounds) if bounds else None
    if lb is not None:
        best = max(lb.parts, key=lambda k: lb.parts[k]["bytes"], default=None)
        s.details["lower_bound"] = {"bytes": lb.bytes, "scope": lb.scope, "status": lb.status,
                                    "time_s": round(lb.time_s, 3), "best_part": best, "parts": lb.parts}
    plan = finish(plan)
    if s.gap == 0.0 and s.status in ("heuristic", "feasible", "fallback", "optimal-fixed-order"):
        s.details["proven_by"] = "lower bound" if lb is not None and lb.bytes == s.bound_bytes else "cp-sat"
        if lb is not None and lb.bytes == s.bound_bytes:
            s.details["proven_by_bound"] = s.details["lower_bound"]["best_part"]  # which of the bounds
        s.status = "optimal"
    return plan


def make_plan(g: Graph, scratchpad_bytes: int, opts: PlanOptions | None = None, progress=None) -> Plan:
    """Plan `g` in `scratchpad_bytes` with opts.planner, validated, within a wall-time limit: on the wall clock
    opts.time_limit_s, on the work clock opts.wall_cap_s (3 x time_limit_s by default). The call returns within
    that limit plus CP-SAT's overshoot of its last solve and the validation after it (wall_limit_slack_s below:
    tests/plan/test_wall_limit.py holds the planners to it): no solve runs past the limit less a reserve
    (opts.wall_reserve_s, at most 5% of the limit) kept for what follows the last solve, and on the wall clock the
    planners' phases share the limit less that reserve. The seeds every planner starts from (the baselines and
    memfit's candidate orders) are computed whatever the limit (8.3 s on NASNet-A at 1 MiB, 1330 ops, load 3): a
    limit shorter than they take is overrun by them. details["clock"] says what the plan took."""
    opts = opts or PlanOptions()
    start = time.perf_counter()
    cap = opts.time_limit_s if opts.clock == "wall" else \
        opts.wall_cap_s if opts.wall_cap_s is not None else 3 * opts.time_limit_s
    reserve = min(opts.wall_reserve_s, 0.05 * cap)
    inner = replace(opts, time_limit_s=max(0.1, opts.time_limit_s - reserve)) if opts.clock == "wall" else opts
    clock = Clock(opts.clock, min_rate=None if opts.clock == "wall" else opts.time_limit_s / cap,
                  wall_end=start + cap - reserve)
    with use(clock):
        plan = _make_plan(g, scratchpad_bytes, inner, progress)
    if plan.solver is not None:
        # the work it did, whether the wall cap stopped it, and the wall time of the whole call against its limit
        plan.solver.details["clock"] = {**clock.summary(), "wall_limit_s": round(cap, 2),
                                        "plan_wall_s": round(time.perf_counter() - start, 2)}
    return plan


def wall_limit_slack_s(time_limit_s: float) -> float:
    """How far past its wall limit a plan may return (make_plan): CP-SAT's overshoot of its last solve (it checks
    the limit between steps) and what follows it beyond the reserve. 1 s, or 5% of limits over 20 s."""
    return max(1.0, 0.05 * time_limit_s)


def _make_plan(g: Graph, scratchpad_bytes: int, opts: PlanOptions, progress=None) -> Plan:
    check_feasible(g, scratchpad_bytes)
    name = opts.planner
    if name == "auto":
        n = len(g.ops)
        name = "exact" if n <= opts.exact_max_ops else "whole" if n <= opts.whole_max_ops else "heuristic"
    if name == "whole":
        return plan_whole(g, scratchpad_bytes, opts, progress)
    if name == "exact":
        return plan_exact(g, scratchpad_bytes, opts)
    if name == "heuristic":
        return plan_heuristic(g, scratchpad_bytes, opts, progress)
    if name in BASELINES:
        return finish(plan_baseline(g, scratchpad_bytes, BASELINES[name]))
    raise PlanError(f"unknown planner {opts.planner!r}; choose one of {', '.join(PLANNERS)}")
