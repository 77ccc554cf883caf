"""The whole-graph planner's order search (memfit.plan.whole_search): which ranges it frees, and how long a
move may take."""
import types

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.planner import best_seed
from memfit.plan.whole_search import SearchConfig, _ranges, search
from tests.plan.graphs import random_dag


def test_ranges_skip_the_ones_far_from_any_load_and_put_the_most_loaded_first():
    loads = [0] * 100
    loads[40], loads[41], loads[90] = 5, 5, 30
    rs = _ranges(loads, 100, 20)  # stride 10: (0, 20), (10, 30), ..., (80, 100)
    assert rs[0] in ((80, 100), (90, 100)) and sum(loads[rs[0][0]:rs[0][1]]) == 30
    # kept: a load within half a range (10 steps) of it; (0, 20) and (10, 30) have none
    assert (0, 20) not in rs and (10, 30) not in rs and (20, 40) in rs and (30, 50) in rs
    assert _ranges([0] * 100, 100, 20) == [(i, min(100, i + 20)) for i in range(0, 90, 10)]  # no loads: all


def test_a_move_that_finds_no_plan_gets_twice_the_time_next_up_to_a_quarter(monkeypatch):
    import memfit.plan.whole_search as ws

    g = random_dag(40, 2)
    cap = scratchpad_sizes(g).min_feasible
    seed = best_seed(g, cap)
    nc = seed.traffic["non_compulsory_bytes"]
    assert nc > 0
    clock = [0.0]
    given: list[float] = []
    outcomes = iter(["none", "none", "none", "none", "infeasible", "infeasible"] + ["infeasible"] * 1000)

    def fake_solve(g_, capacity, order, cfg, hint=None, floor_bytes=0, below_bytes=None, frozen=None):
        if cfg.free_range is None:  # a fixed-order solve: hand the seed back as optimal
            clock[0] += 0.1
            return types.SimpleNamespace(status="optimal", objective_bytes=nc, bound_bytes=nc, order=order,
                                         placements=hint, time_s=0.1, stats={})
        given.append(round(cfg.time_limit_s, 3))
        clock[0] += cfg.time_limit_s if given and len(given) <= 4 else 0.01
        return types.SimpleNamespace(status=next(outcomes), objective_bytes=-1, bound_bytes=0, order=[],
                                     placements=[], time_s=cfg.time_limit_s, stats={})

    monkeypatch.setattr(ws, "solve_whole", fake_solve)
    monkeypatch.setattr(ws.time, "perf_counter", lambda: clock[0])
    search(g, cap, [seed], SearchConfig(time_limit_s=100.0, num_workers=1))
    # 5 s at first (5% of 100), doubled after each move without a plan, capped at 25 s; halved after a solved one
    assert given[:6] == [5.0, 10.0, 20.0, 25.0, 25.0, 12.5]


def test_a_seed_over_twice_the_best_candidate_is_not_solved():
    from memfit.plan.planner import seed_plans
    from tests.plan.graphs import random_branching_dag

    g = random_branching_dag(40, 2)  # seeds from 192 to 2176 bytes
    cap = scratchpad_sizes(g).min_feasible
    seeds = seed_plans(g, cap)
    best = seeds[0].traffic["non_compulsory_bytes"]
    far = [p for p in seeds if p.traffic["non_compulsory_bytes"] > 2 * best]
    near = [p for p in seeds if p.traffic["non_compulsory_bytes"] <= best]
    assert far and near
    _, _, stats = search(g, cap, [near[0], far[0]], SearchConfig(time_limit_s=4, num_workers=1, candidates=4))
    assert [c["seed"] for c in stats["candidates"]] == [near[0].planner]
