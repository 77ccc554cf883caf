"""The fast all-orders bounds for large graphs (memfit.plan.bound_cut, memfit.plan.bound_every): never above the
optimum over all orders, and not trivially zero where every order must evict."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound_cut import cut_bound
from memfit.plan.bound_every import every_order_bound
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph
from memfit.plan.planner import PlanOptions, best_seed, make_plan
from tests.plan.graphs import random_branching_dag, random_dag


def test_cut_takes_the_cheaper_side_of_a_disjunction():
    """Either x (side after big) or side's result s (side before big) is live across big: the smallest prefix
    cut is s (4 bytes), over a scratchpad that big's working set fills; x is an input, so each byte counts
    once. The optimum (6, reload x) is above it; the every-order bound sees neither as forced."""
    t = [TensorSpec("x", 6, "input"), TensorSpec("m", 4, "activation"), TensorSpec("w", 20, "weight"),
         TensorSpec("h", 4, "activation"), TensorSpec("s", 4, "activation"), TensorSpec("y", 4, "output")]
    ops = [OpSpec("a", ["x"], ["m"]), OpSpec("big", ["m", "w"], ["h"]), OpSpec("side", ["x"], ["s"]),
           OpSpec("join", ["h", "s"], ["y"])]
    g = build_graph("disjunction", t, ops)
    assert cut_bound(g, 28).bytes == 4 and cut_bound(g, 28).tight_ops == ["big"]
    assert cut_bound(g, 32).bytes == 0
    assert every_order_bound(g, 28).bytes == 0


def test_every_order_counts_each_gap_of_a_tensor():
    """a's result r is read by c1 and c2; big1 runs between r's production and c1, big2 between c1 and c2 in
    every order, and each fills the scratchpad but for r: r is evicted twice (2 x 2 x 8 bytes)."""
    t = [TensorSpec("x", 2, "input"), TensorSpec("r", 8, "activation"), TensorSpec("t0", 2, "activation"),
         TensorSpec("w1", 20, "weight"),
         TensorSpec("w2", 20, "weight"), TensorSpec("m1", 2, "activation"), TensorSpec("m2", 2, "activation"),
         TensorSpec("k1", 2, "activation"), TensorSpec("k2", 2, "activation"), TensorSpec("y", 2, "output")]
    ops = [OpSpec("a", ["x"], ["r", "t0"]), OpSpec("big1", ["t0", "w1"], ["m1"]), OpSpec("c1", ["r", "m1"], ["k1"]),
           OpSpec("big2", ["k1", "w2"], ["m2"]), OpSpec("c2", ["r", "m2"], ["k2"]), OpSpec("j", ["k2"], ["y"])]
    g = build_graph("two_gaps", t, ops)
    lb = every_order_bound(g, 26)
    assert lb.bytes == 32 and set(lb.tight_ops) == {"big1", "big2"}
    opt = solve_segment(g, 26, Segment(g.topo_order(), free_order=True), ExactConfig(10, 1))
    assert opt.status == "optimal" and opt.objective_bytes >= 32


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 9, s) for s in range(4)] +
                         [(random_dag, 12, s) for s in range(3)])
def test_bounds_never_exceed_the_optimum_over_all_orders(maker, n, seed):
    g = maker(n, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        opt = solve_segment(g, cap, Segment(best_seed(g, cap).order, free_order=True), ExactConfig(20, 1))
        assert opt.status == "optimal"
        assert cut_bound(g, cap).bytes <= opt.objective_bytes
        assert every_order_bound(g, cap, num_workers=1).bytes <= opt.objective_bytes


def test_planner_reports_each_bound_and_takes_the_largest():
    g = random_branching_dag(40, 1)
    cap = scratchpad_sizes(g).min_feasible
    plan = make_plan(g, cap, PlanOptions(planner="heuristic", time_limit_s=4, num_workers=1))
    parts = plan.solver.details["lower_bound"]["parts"]
    rows = {"min-cut", "every-order", "cover", "order-pairs"}
    # the span bound (given time for it), then the split bound, run where the row bounds leave a gap (the split
    # bound not once the span bound has closed it)
    assert set(parts) in (rows, rows | {"span"}, rows | {"split"}, rows | {"span", "split"})
    assert plan.solver.bound_bytes == max(p["bytes"] for p in parts.values())
    assert plan.solver.bound_bytes <= plan.traffic["non_compulsory_bytes"]


def test_unordered_pairs_counts_ops_neither_of_which_precedes_the_other():
    from memfit.plan.bound import unordered_pairs
    from tests.plan.graphs import order_matters

    assert unordered_pairs(order_matters()) == 2  # b runs either side of a and of c
    assert unordered_pairs(random_dag(12, 0, weights=False)) <= 66
