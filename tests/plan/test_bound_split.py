"""The split bound (memfit.plan.bound_split): each tensor charged in exactly one piece, the sum never above the
optimum over all orders (CP-SAT, per-step exact model, order free) on random branching DAGs, and the whole-graph
model's `costed` option charging only the tensors named."""
import time

import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound_split import pieces, split_bound
from memfit.plan.planner import best_seed
from memfit.plan.whole import WholeConfig, solve_whole
from tests.plan.graphs import optimum_over_all_orders, random_branching_dag, random_dag


def test_pieces_charge_every_tensor_once_and_hold_all_its_uses():
    g = random_branching_dag(30, 2)
    ps = pieces(g, 7)
    charged = [n for _, group in ps for n in group]
    assert sorted(charged) == sorted(t.name for t in g.tensors if t.producer or t.consumers)
    for ops, group in ps:
        for n in group:
            t = g.tensor[n]
            assert set(t.consumers) <= set(ops) and (t.producer is None or t.producer in ops)


def test_costed_charges_only_the_named_tensors():
    g = random_branching_dag(10, 1)
    cap = scratchpad_sizes(g).min_feasible
    order = best_seed(g, cap).order
    full = solve_whole(g, cap, order, WholeConfig(10, 1, order_window=None))
    none = solve_whole(g, cap, order, WholeConfig(10, 1, order_window=None), costed=set())
    assert full.status == none.status == "optimal"
    assert none.objective_bytes == 0 and full.objective_bytes > 0


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 10, s) for s in range(5)] +
                         [(random_branching_dag, 12, s) for s in range(5, 8)] + [(random_dag, 12, s) for s in range(3)])
@pytest.mark.usefixtures("work_clock")
def test_split_bound_never_exceeds_the_optimum_over_all_orders(maker, n, seed):
    g = maker(n, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        opt = optimum_over_all_orders(g, cap)
        for piece_ops in (2, 3, 5, n):
            sb = split_bound(g, cap, piece_ops, time_limit_s=20, num_workers=1)
            assert sb.status == "optimal"
            assert sb.bytes <= opt, (piece_ops, sb.pieces)
            if piece_ops >= n:  # one piece charged for everything: the optimum itself
                assert sb.bytes == opt


def test_a_piece_the_first_pass_had_no_time_for_is_solved_in_the_second(monkeypatch):
    """The first pass overruns on piece 0 (its solve takes longer than the pass's half of the time): the pieces
    after it never ran then and must get the second pass's time, not be left out of the sum."""
    import types

    import memfit.plan.whole as whole

    g = random_branching_dag(12, 0)
    n = len(pieces(g, 4))
    assert n >= 2
    clock = [0.0]
    calls: list[int] = []

    def fake_solve(sub, capacity, ops, cfg, costed=None):
        calls.append(len(calls))
        clock[0] += 6.0 if len(calls) == 1 else 0.1  # the first solve overruns the first pass (5 s of 10)
        return types.SimpleNamespace(status="feasible" if len(calls) == 1 else "optimal", bound_bytes=100,
                                     objective_bytes=100, time_s=0.1)

    monkeypatch.setattr(whole, "solve_whole", fake_solve)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])  # the wall clock (memfit.plan.clock)
    sb = split_bound(g, scratchpad_sizes(g).mid, 4, time_limit_s=10.0)
    assert len(sb.pieces) == n and sb.bytes == 100 * n


@pytest.mark.usefixtures("work_clock")
def test_enough_bytes_stops_once_the_sum_reaches_it():
    g = random_branching_dag(24, 2)  # 3-op pieces: the first and the third bound 192 bytes each
    cap = scratchpad_sizes(g).min_feasible
    full = split_bound(g, cap, 3, time_limit_s=40, num_workers=1)
    assert full.status == "optimal" and full.bytes > 0
    first = next(p["bound_bytes"] for p in full.pieces if p["bound_bytes"] > 0)
    early = split_bound(g, cap, 3, time_limit_s=40, num_workers=1, enough_bytes=first)
    assert early.status == "enough" and first <= early.bytes <= full.bytes
    assert len(early.pieces) < len(full.pieces)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.usefixtures("work_clock")
def test_skipping_the_pieces_that_fit_stays_a_bound_and_skips_only_those(seed):
    from memfit.plan.analysis import memory_aware_order, peak_live_bytes, subgraph

    g = random_branching_dag(12, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        opt = optimum_over_all_orders(g, cap)
        sb = split_bound(g, cap, 3, time_limit_s=20, num_workers=1, skip_fitting=True)
        assert sb.bytes <= opt
        fitting = [ops for ops, _ in pieces(g, 3) if any(peak_live_bytes(sub, o) <= cap for sub in [subgraph(g, ops)]
                                                        for o in (sub.topo_order(), memory_aware_order(sub)))]
        assert sb.skipped == len(fitting) and len(sb.pieces) == len(pieces(g, 3)) - len(fitting)
