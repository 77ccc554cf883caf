"""The covering bound over min-cut and every-order rows (memfit.plan.bound_cover): never above the optimum over
all orders, never below the two bounds whose rows it holds once solved, and above both on branched cells."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan import bound_cover
from memfit.plan.bound_cover import _cover_cpsat, cover_bound, cover_lp_bound, cover_rows
from memfit.plan.bound_cut import cut_bound
from memfit.plan.bound_every import every_order_bound
from memfit.plan.clock import Clock, use
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.planner import best_seed
from tests.plan.graphs import random_branching_dag, random_dag


def _optimum(g, cap) -> int:
    with use(Clock("work")):  # 20 s of CP-SAT work however loaded the machine (20 s of wall time fell short at load 10)
        opt = solve_segment(g, cap, Segment(best_seed(g, cap).order, free_order=True), ExactConfig(20, 1))
    assert opt.status == "optimal"
    return opt.objective_bytes


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 9, s) for s in (0, 3, 6, 7)] +
                         [(random_dag, 12, s) for s in (0, 3)] + [(random_branching_dag, 11, 13)])
def test_cover_bound_between_the_row_bounds_and_the_optimum(maker, n, seed):
    g = maker(n, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        lb = cover_bound(g, cap, time_limit_s=10, num_workers=1)
        assert lb.scope == "all orders" and lb.bytes <= _optimum(g, cap)
        if lb.status == "optimal":  # its rows include every row of both, and evictions are shared at least as well
            assert lb.bytes >= max(cut_bound(g, cap).bytes, every_order_bound(g, cap, num_workers=1).bytes)


def test_cover_bound_beats_both_row_bounds_on_a_branched_cell():
    """random_branching_dag(9, 0) at its smallest scratchpad: the min cut sums only ops with disjoint candidate
    tensors (96) and nothing is live in every order (0); the covering model shares evictions across ops and
    proves 128 of the optimum's 192."""
    g = random_branching_dag(9, 0)
    cap = scratchpad_sizes(g).min_feasible
    cut, every = cut_bound(g, cap).bytes, every_order_bound(g, cap, num_workers=1).bytes
    lb = cover_bound(g, cap, time_limit_s=10, num_workers=1)
    assert lb.status == "optimal" and lb.bytes > max(cut, every)
    assert lb.bytes <= _optimum(g, cap)


def test_cover_rows_name_only_gaps_the_op_can_lie_in():
    g = random_branching_dag(11, 13)
    cap = scratchpad_sizes(g).min_feasible
    rows, complete = cover_rows(g, cap)
    assert complete and rows
    for op, rng, need in rows:
        assert need > 0
        for v, (lo, hi) in rng.items():
            t = g.tensor[v]
            assert op not in t.consumers and op != t.producer  # o's own working set is never evicted at o
            assert 0 <= lo <= hi <= len(t.consumers)


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 9, 6), (random_dag, 12, 3),
                                          (random_branching_dag, 11, 13)])
def test_lp_bound_below_the_integer_model_and_the_optimum(maker, n, seed):
    """The LP bound is the Lagrangian value of GLOP's duals: at most the covering model's integer optimum
    (CP-SAT, solved here), which is at most the plan optimum; and not zero where that optimum is large."""
    g = maker(n, seed)
    cap = scratchpad_sizes(g).min_feasible
    rows, _ = cover_rows(g, cap)
    ip, solved = _cover_cpsat(g, cap, rows, 10, 1)
    lp = cover_lp_bound(g, cap)
    assert solved and 0 < lp.bytes <= ip <= _optimum(g, cap)


def test_large_cover_models_get_the_lp_bound_only(monkeypatch):
    g = random_branching_dag(11, 13)
    cap = scratchpad_sizes(g).min_feasible
    monkeypatch.setattr(bound_cover, "CPSAT_MAX_OUTS", 0)
    lb = cover_bound(g, cap, time_limit_s=5, num_workers=1)
    assert lb.status == "bound" and lb.bytes == cover_lp_bound(g, cap).bytes
    monkeypatch.setattr(bound_cover, "CPSAT_MAX_OUTS", 10**9)
    assert cover_bound(g, cap, time_limit_s=10, num_workers=1).bytes > lb.bytes  # 288 (CP-SAT) against 256
