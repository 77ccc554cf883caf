"""The whole-graph CP-SAT model (memfit.plan.whole): it must reach the optimum that the per-step exact model
(memfit.plan.exact, brute force over steps) proves, order fixed or free, and every plan it returns is valid."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.plan_format import OpSpec, Plan, TensorSpec, build_graph
from memfit.plan.planner import PlanOptions, best_seed, make_plan
from memfit.plan.validate import validate
from memfit.plan.whole import WholeConfig, solve_whole
from tests.plan.graphs import order_matters, random_branching_dag, random_dag


def _sizes(g):
    s = scratchpad_sizes(g)
    return sorted({s.min_feasible, (s.min_feasible + s.mid) // 2, s.mid})


def _check(g, cap, res):
    """The plan is valid and the model's objective is exactly the validator's count."""
    assert res.status in ("optimal", "feasible")
    traffic = validate(Plan(g, cap, res.order, res.placements))
    assert traffic["non_compulsory_bytes"] == res.objective_bytes
    assert res.bound_bytes <= res.objective_bytes
    return res.objective_bytes


@pytest.mark.parametrize("maker,n,seed", [(random_dag, 14, 0), (random_dag, 14, 1), (random_branching_dag, 10, 2),
                                          (random_branching_dag, 12, 3), (random_branching_dag, 12, 4)])
def test_fixed_order_matches_the_per_step_exact_model(maker, n, seed):
    g = maker(n, seed)
    for cap in _sizes(g):
        base = best_seed(g, cap)
        ref = solve_segment(g, cap, Segment(base.order, free_order=False), ExactConfig(20, 1))
        for hint in (None, base.placements):  # with and without the warm start
            res = solve_whole(g, cap, base.order, WholeConfig(20, 1, order_window=0), hint=hint)
            assert ref.status == res.status == "optimal" and res.scope == "fixed order"
            assert _check(g, cap, res) == ref.objective_bytes
            assert res.order == base.order


@pytest.mark.parametrize("seed", range(5))
def test_free_order_matches_the_per_step_exact_model(seed):
    g = random_branching_dag(9, 10 + seed)
    for cap in _sizes(g):
        base = best_seed(g, cap)
        ref = solve_segment(g, cap, Segment(base.order, free_order=True), ExactConfig(20, 1))
        res = solve_whole(g, cap, base.order, WholeConfig(20, 1, order_window=None), hint=base.placements)
        assert ref.status == res.status == "optimal" and res.scope == "all orders"
        assert _check(g, cap, res) == ref.objective_bytes
        assert res.objective_bytes <= base.traffic["non_compulsory_bytes"]


def test_free_order_avoids_the_spill_the_framework_order_needs():
    g = order_matters()
    fixed = solve_whole(g, 21, g.topo_order(), WholeConfig(10, 1, order_window=0))
    free = solve_whole(g, 21, g.topo_order(), WholeConfig(10, 1, order_window=None))
    assert _check(g, 21, fixed) == 16  # Y stored and reloaded around c
    assert _check(g, 21, free) == 0 and free.order.index("c") < free.order.index("b")


def test_interchangeable_branches_keep_the_optimum():
    """Two identical branches (same inputs, sizes and reader): symmetry breaking orders them, and the optimum
    is the one the per-step model finds."""
    t = [TensorSpec("x", 8, "input"), TensorSpec("w", 4, "weight"), TensorSpec("y1", 8, "activation"),
         TensorSpec("y2", 8, "activation"), TensorSpec("z1", 8, "activation"), TensorSpec("z2", 8, "activation"),
         TensorSpec("out", 8, "output")]
    ops = [OpSpec("b1", ["x", "w"], ["y1"]), OpSpec("b2", ["x", "w"], ["y2"]), OpSpec("c1", ["y1"], ["z1"]),
           OpSpec("c2", ["y2"], ["z2"]), OpSpec("j", ["z1", "z2"], ["out"])]
    g = build_graph("twins", t, ops)
    for cap in (24, 28, 32):
        ref = solve_segment(g, cap, Segment(g.topo_order(), free_order=True), ExactConfig(10, 1))
        res = solve_whole(g, cap, g.topo_order(), WholeConfig(10, 1, order_window=None))
        assert ref.status == res.status == "optimal"
        assert _check(g, cap, res) == ref.objective_bytes


def test_free_range_only_moves_ops_inside_and_never_worsens_the_hint():
    g = random_branching_dag(24, 7)
    cap = _sizes(g)[0]
    base = best_seed(g, cap)
    res = solve_whole(g, cap, base.order, WholeConfig(10, 1, free_range=(6, 16)), hint=base.placements)
    assert _check(g, cap, res) <= base.traffic["non_compulsory_bytes"]
    assert res.order[:6] == base.order[:6] and res.order[16:] == base.order[16:]
    assert res.scope == "fixed order outside steps 6..15"


def test_whole_planner_is_valid_labelled_and_bounded():
    g = random_branching_dag(30, 5)
    for cap in _sizes(g)[:2]:
        plan = make_plan(g, cap, PlanOptions(planner="whole", time_limit_s=4, num_workers=1))
        assert plan.traffic == validate(plan)
        assert plan.solver.bound_bytes is not None and plan.solver.bound_bytes <= plan.traffic["non_compulsory_bytes"]
        d = plan.solver.details
        assert d["requested_planner"] == "whole"
        if plan.planner == "whole":  # a returned seed carries the seed's own name instead
            assert plan.traffic["non_compulsory_bytes"] < d["seed_non_compulsory_bytes"]
            assert plan.solver.status in ("optimal", "optimal-fixed-order", "feasible")
        elif plan.planner == "heuristic":  # the whole model added nothing to the windows' plan
            assert d["produced_by_windows"] and plan.traffic["non_compulsory_bytes"] < d["seed_non_compulsory_bytes"]
        else:
            assert plan.planner == d["seed_planner"]
