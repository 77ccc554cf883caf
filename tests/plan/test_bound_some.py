"""Tensors live across a window only in some orders (memfit.plan.bound_some, span_bound(some_orders=...)): found
with their anchors, charged where the span bound sees nothing, each tensor's weights adding up to at most 1, the
sum never above the optimum over all orders (per-step exact model, order free) on random branching DAGs, and a
wrong weighting caught by the same check."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound import reachability
from memfit.plan.bound_some import sometimes_live
from memfit.plan.bound_span import SCALE, drop_cost, span_bound, span_pieces
from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph
from tests.plan.graphs import optimum_over_all_orders, random_branching_dag, random_dag


def either_held():
    """q1 -> q2 -> q3 (64-byte activations); p1 writes T1 and q1's input, r1 reads T1 and U from p2; p2 writes T2,
    read by r2 after q3. If p2 runs after q3, so does r1, and T1 is live across the chain; otherwise T2 is live
    across some of it. Neither is live across it in every order. At 160 bytes neither fits beside a chain op."""
    t = [TensorSpec("x", 32, "input"), TensorSpec("T1", 64, "activation"), TensorSpec("T2", 64, "activation"),
         TensorSpec("U", 32, "activation")] + [TensorSpec(f"A{i}", 64, "activation") for i in range(4)] + \
        [TensorSpec("O1", 32, "output"), TensorSpec("O2", 32, "output")]
    ops = [OpSpec("p1", ["x"], ["T1", "A0"]), OpSpec("p2", ["x"], ["T2", "U"]), OpSpec("q1", ["A0"], ["A1"]),
           OpSpec("q2", ["A1"], ["A2"]), OpSpec("q3", ["A2"], ["A3"]), OpSpec("r1", ["T1", "U"], ["O1"]),
           OpSpec("r2", ["T2", "A3"], ["O2"])]
    return build_graph("either_held", t, ops), 160


def test_tensors_live_in_some_orders_come_with_their_writer_and_last_readers():
    g, _ = either_held()
    pos = {o: i for i, o in enumerate(g.topo_order())}
    found = sometimes_live(g, ["q2"], set(), pos, reachability(g), limit=8)
    assert found == {"T1": ["p1", "r1"], "T2": ["p2", "r2"], "U": ["p2", "r1"]}
    assert sometimes_live(g, ["q2"], {"T1"}, pos, reachability(g), limit=1) == {"T2": ["p2", "r2"]}  # largest


def test_every_tensor_weighs_at_most_one_over_its_windows():
    g = random_branching_dag(30, 3)
    total: dict[str, int] = {}
    for p in span_pieces(g, 4, some_orders=8):
        for n, c in list(p.costed.items()) + [(n, c) for n, (_, _, c) in p.through.items()]:
            total[n] = total.get(n, 0) + c
    assert total and all(c <= SCALE * drop_cost(g, n) for n, c in total.items())


@pytest.mark.usefixtures("work_clock")
def test_a_tensor_held_in_some_orders_is_charged_where_the_span_bound_sees_nothing():
    g, cap = either_held()
    opt = optimum_over_all_orders(g, cap)
    assert opt == 320
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False).bytes == 0
    sb = span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False, some_orders=8)
    assert sb.status == "optimal" and 0 < sb.bytes <= opt


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 10, s) for s in (1, 2, 3)] +
                         [(random_branching_dag, 14, 7), (random_dag, 12, 0), (random_dag, 12, 2)])
@pytest.mark.usefixtures("work_clock")
def test_the_bound_never_exceeds_the_optimum_over_all_orders(maker, n, seed):
    g = maker(n, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        opt = optimum_over_all_orders(g, cap) if (n, seed) != (14, 7) or cap == scratchpad_sizes(g).min_feasible else None
        if opt is None:
            continue
        for piece_ops in (1, 2, 3, 5):
            sb = span_bound(g, cap, piece_ops, time_limit_s=20, num_workers=1, skip_fitting=False, some_orders=8)
            assert sb.status == "optimal"
            assert sb.bytes <= opt, (piece_ops, sb.pieces)


@pytest.mark.usefixtures("work_clock")
def test_the_check_catches_weights_that_add_up_to_more_than_one(monkeypatch):
    """Each window charged a tensor's full cost: the sum is then above the optimum, which the check above would
    report."""
    import memfit.plan.bound_span as bs

    g, cap = either_held()
    opt = optimum_over_all_orders(g, cap)
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False, some_orders=8).bytes <= opt
    monkeypatch.setattr(bs, "weight", lambda windows: SCALE)
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False, some_orders=8).bytes > opt


@pytest.mark.usefixtures("work_clock")
def test_the_anchors_order_is_what_charges_them(monkeypatch):
    """Without the graph's precedences between the anchors and the window, the anchors move anywhere, every
    tensor can be kept clear of the chain, and the bound falls to 0: the precedences carry the bound."""
    import memfit.plan.bound_span as bs

    g, cap = either_held()
    real = bs.with_anchors
    monkeypatch.setattr(bs, "with_anchors", lambda *a: (real(*a)[0], []))
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False, some_orders=8).bytes == 0
