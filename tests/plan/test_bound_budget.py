"""The all-orders bounds share one budget (PlanOptions.bounds_share of the time limit), and the whole planner's
candidate orders stop at the first fixed-order solve that is not proven. Both are checked with fake clocks and
fake solvers: which limits the bounds are given, which run, which seeds are solved."""
import time
import types

from memfit.plan import bound, bound_cover, bound_cut, bound_every, bound_span, bound_split, planner_bounds
from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound import LowerBound
from memfit.plan.options import PlanOptions
from memfit.plan.planner import best_seed, seed_plans
from tests.plan.graphs import random_branching_dag, random_dag


def _fake_bounds(monkeypatch, clock: list[float], overshoot: float) -> list[tuple[str, float]]:
    """Every bound replaced by one that records its limit and advances the (wall) clock by overshoot x it, as
    CP-SAT did on DenseNet-121 (8.5 s for a 4.5 s deterministic limit)."""
    given: list[tuple[str, float]] = []
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def fake(name: str, nbytes: int, pos: int):
        def run(*args, **kwargs):
            limit = kwargs.get("time_limit_s", args[pos] if len(args) > pos else None)
            given.append((name, round(limit, 3)))
            clock[0] += overshoot * limit
            return LowerBound(nbytes, "all orders", "bound", overshoot * limit, ["op0"])
        return run

    monkeypatch.setattr(bound_cut, "cut_bound", lambda *a, **k: (clock.__setitem__(0, clock[0] + 1.0), LowerBound(
        10, "all orders", "optimal", 1.0))[1])
    monkeypatch.setattr(bound_every, "every_order_bound", fake("every-order", 20, 2))
    monkeypatch.setattr(bound_cover, "cover_bound", fake("cover", 30, 2))
    monkeypatch.setattr(bound, "lower_bound", fake("order-pairs", 40, 2))
    monkeypatch.setattr(planner_bounds, "lower_bound", fake("order-pairs", 40, 2))

    def piecewise(name: str, nbytes: int):
        def run(g, cap, piece_ops, limit, *a, **k):
            given.append((name, round(limit, 3)))
            clock[0] += overshoot * limit
            return types.SimpleNamespace(bytes=nbytes, status="partial", time_s=overshoot * limit, pieces=[],
                                         skipped=0)
        return run

    monkeypatch.setattr(bound_span, "span_bound", piecewise("span", 50))
    monkeypatch.setattr(bound_split, "split_bound", piecewise("split", 60))
    return given


def test_the_bounds_stop_at_their_share_of_the_time_limit(monkeypatch):
    g = random_dag(12, 1)  # small enough for the order-pair bound
    cap = scratchpad_sizes(g).min_feasible
    clock = [0.0]
    given = _fake_bounds(monkeypatch, clock, overshoot=2.0)
    opts = PlanOptions(time_limit_s=45.0, bounds_share=0.4)  # 18 s for all bounds; shares 4.5, cover 9
    lb = planner_bounds.all_orders_bound(g, cap, opts)
    # min cut 1 s; every-order its 4.5 (and takes 9); cover what is left of 18 (8, not its 9); order pairs none
    assert given == [("every-order", 4.5), ("cover", 8.0)]
    assert lb.parts["order-pairs"] == {"bytes": 0, "status": "no time", "time_s": 0.0}
    assert lb.bytes == 30 and lb.time_s == 1.0 + 9.0 + 16.0  # the largest of the bounds that ran
    seed = types.SimpleNamespace(traffic={"non_compulsory_bytes": 10**6})
    out = planner_bounds.with_split_bound(g, cap, opts, lb, seed, 0.0)
    assert given == [("every-order", 4.5), ("cover", 8.0)]  # the budget is spent: no span, no split bound
    assert out.parts["span"]["status"] == out.parts["split"]["status"] == "no time" and out.bytes == 30


def test_the_span_and_split_bounds_get_what_the_row_bounds_left_of_the_budget(monkeypatch):
    g = random_dag(12, 1)
    cap = scratchpad_sizes(g).min_feasible
    clock = [0.0]
    given = _fake_bounds(monkeypatch, clock, overshoot=1.0)
    opts = PlanOptions(time_limit_s=100.0, bounds_share=0.3)  # 30 s: shares 5 (capped), cover 10
    lb = planner_bounds.all_orders_bound(g, cap, opts)
    assert given == [("every-order", 5.0), ("cover", 10.0), ("order-pairs", 5.0)]  # 21 s of 30
    seed = types.SimpleNamespace(traffic={"non_compulsory_bytes": 10**6})
    out = planner_bounds.with_split_bound(g, cap, opts, lb, seed, 0.0)
    # span: min(its 8%, half the limit left, 30 - 21) = 8; split: min(25, ..., 30 - 29) = 1
    assert given[3:] == [("span", 8.0), ("split", 1.0)] and out.bytes == 60
    # with the whole limit as the budget the split bound gets its own share again
    given.clear()
    clock[0] = 0.0
    lb = planner_bounds.all_orders_bound(g, cap, PlanOptions(time_limit_s=100.0, bounds_share=1.0))
    planner_bounds.with_split_bound(g, cap, PlanOptions(time_limit_s=100.0, bounds_share=1.0), lb, seed, 0.0)
    assert given[-1] == ("split", 25.0)


def _fake_whole(monkeypatch, first_status: str) -> list[str]:
    """solve_whole replaced: a fixed-order solve hands its hint back with first_status for the first seed and
    "optimal" after; an order-search move proves there is nothing better. Returns the orders' first ops solved."""
    import memfit.plan.whole_search as ws

    solved: list[str] = []

    def fake(g, capacity, order, cfg, hint=None, floor_bytes=0, below_bytes=None, frozen=None):
        nc = _plan_bytes[tuple(order)]
        if cfg.free_range is None:
            solved.append(tuple(order))
            status = first_status if len(solved) == 1 else "optimal"
            return types.SimpleNamespace(status=status, objective_bytes=nc, bound_bytes=nc if status == "optimal"
                                         else 0, order=order, placements=hint, time_s=0.1, stats={})
        return types.SimpleNamespace(status="infeasible", objective_bytes=-1, bound_bytes=0, order=[],
                                     placements=[], time_s=0.01, stats={})

    monkeypatch.setattr(ws, "solve_whole", fake)
    return solved


_plan_bytes: dict[tuple, int] = {}


def test_candidate_orders_stop_at_the_first_fixed_order_solve_not_proven(monkeypatch):
    from memfit.plan.whole_search import SearchConfig, search

    g = random_branching_dag(40, 2)
    cap = scratchpad_sizes(g).min_feasible
    seeds = []
    for p in seed_plans(g, cap):  # distinct orders within twice the best, so each is a candidate
        if p.order not in [s.order for s in seeds] and p.traffic["non_compulsory_bytes"] <= 2 * best_seed(
                g, cap).traffic["non_compulsory_bytes"]:
            seeds.append(p)
            _plan_bytes[tuple(p.order)] = p.traffic["non_compulsory_bytes"]
    assert len(seeds) >= 2
    for status, want in (("optimal", min(4, len(seeds))), ("feasible", 1), ("none", 1)):
        solved = _fake_whole(monkeypatch, status)
        _, _, stats = search(g, cap, seeds, SearchConfig(time_limit_s=100, num_workers=1))
        # the final proof solve comes after the candidates
        assert len(stats["candidates"]) == want and len(solved) == want + 1, status
        assert ("candidates_stopped" in stats) == (status != "optimal")
