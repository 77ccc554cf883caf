"""The whole-graph planner's order search (memfit.plan.whole_search): which ranges it frees, and how long a
move may take."""
import time
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
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])  # the wall clock (memfit.plan.clock)
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


def test_reload_steps_leave_out_the_first_load_of_an_input_and_keep_every_other_load():
    from memfit.plan.plan_format import OpSpec, Placement, TensorSpec, build_graph
    from memfit.plan.whole_search import prefix_range, reload_steps

    g = build_graph("g", [TensorSpec("x", 8, "input"), TensorSpec("a", 8, "activation"),
                          TensorSpec("b", 8, "activation"), TensorSpec("y", 8, "output")],
                    [OpSpec("p", ["x"], ["a"]), OpSpec("q", ["a"], ["b"]), OpSpec("r", ["x", "a", "b"], ["y"])])
    order = ["p", "q", "r"]
    # x loaded at 0 (compulsory) and again at 2; a written at 0, spilled, reloaded at 2; b and y never reloaded
    pl = [Placement("x", 0, 0, 0), Placement("a", 8, 0, 1), Placement("b", 0, 1, 2), Placement("x", 16, 2, 2),
          Placement("a", 24, 2, 2), Placement("y", 32, 2, 2)]
    assert reload_steps(g, pl, order) == [2, 2]
    plan = types.SimpleNamespace(order=order, placements=pl)
    assert prefix_range(g, plan, min_ops=2, max_ops=80) == (0, 3)  # one past the last reload
    assert prefix_range(g, plan, min_ops=2, max_ops=2) is None  # a reload at or past max_ops: no prefix move
    assert prefix_range(g, types.SimpleNamespace(order=order, placements=pl[:3] + pl[5:]), 2, 80) is None


def test_the_prefix_move_removes_every_spill_where_a_reorder_does_and_the_search_is_skipped():
    from memfit.plan.planner import PlanOptions, make_plan
    from memfit.plan.whole_search import prefix_move
    from tests.plan.graphs import random_branching_dag

    g = random_branching_dag(12, 4)  # at 488 bytes the best seed moves 192 bytes; some order moves nothing
    seed = best_seed(g, 488)
    assert seed.traffic["non_compulsory_bytes"] > 0
    plan, st = prefix_move(g, 488, seed, 20, 1)
    assert st["free_steps"] == [0, 12] and st["status"] == "optimal"
    assert plan.traffic["non_compulsory_bytes"] == 0 and plan.order != seed.order  # validated on the way out
    p = make_plan(g, 488, PlanOptions(planner="whole", time_limit_s=20, num_workers=1, bound=True))
    d = p.solver.details
    assert p.traffic["non_compulsory_bytes"] == 0 and p.planner == "whole" and p.solver.status == "optimal"
    assert d["prefix_move"]["bytes"] == 0 and "windows" not in d and "order_search" not in d


def test_no_prefix_move_where_a_reload_sits_late():
    from memfit.plan.whole_search import prefix_move, reload_steps

    g = random_dag(40, 2)
    cap = scratchpad_sizes(g).min_feasible
    seed = best_seed(g, cap)
    late = reload_steps(g, seed.placements, seed.order)[-1]
    plan, st = prefix_move(g, cap, seed, 5, 1, max_ops=late)
    assert st is None and plan is seed
