"""The span bound (memfit.plan.bound_span): tensors live across a window in every order, each tensor's weights
adding up to at most 1, the sum never above the optimum over all orders (per-step exact model, order free) on
random branching DAGs, and a wrong weighting caught by the same check."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound_span import SCALE, live_across, span_bound, span_pieces
from memfit.plan.bound_split import split_bound
from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph
from tests.plan.graphs import optimum_over_all_orders, random_branching_dag, random_dag


def held_across():
    """p writes T, read again only by r; q1..q3 run in between in every order (a chain). At 160 bytes T does
    not fit beside q2 or q3, so any plan drops it once: 2 x 64 bytes. Each 2-op piece fits on its own."""
    t = [TensorSpec("x", 32, "input"), TensorSpec("T", 64, "activation")] + \
        [TensorSpec(f"A{i}", 64, "activation") for i in (1, 2, 3)] + [TensorSpec("out", 32, "output")]
    ops = [OpSpec("p", ["x"], ["T"]), OpSpec("q1", ["T"], ["A1"]), OpSpec("q2", ["A1"], ["A2"]),
           OpSpec("q3", ["A2"], ["A3"]), OpSpec("r", ["T", "A3"], ["out"])]
    return build_graph("held_across", t, ops), 160


def test_live_across_is_the_ops_between_a_write_and_a_later_read_in_every_order():
    g, _ = held_across()
    bit = {o.name: 1 << i for i, o in enumerate(g.ops)}
    live = live_across(g)
    assert live["T"] == bit["q2"] | bit["q3"]  # q1 reads T: in its working set, not across it
    assert set(live) == {"T"}


def test_every_tensor_weighs_at_most_one_over_its_windows():
    g = random_branching_dag(30, 3)
    total: dict[str, int] = {}
    for p in span_pieces(g, 4):
        for n, c in p.costed.items():
            total[n] = total.get(n, 0) + c
        for n, (ops, size, c) in p.through.items():
            assert not {n} & {x for o in ops for x in g.op[o].inputs + g.op[o].outputs}
            total[n] = total.get(n, 0) + c
    from memfit.plan.bound_span import drop_cost
    assert total and all(c <= SCALE * drop_cost(g, n) for n, c in total.items())


@pytest.mark.usefixtures("work_clock")
def test_a_tensor_held_across_pieces_is_charged_where_the_split_bound_sees_nothing():
    g, cap = held_across()
    opt = optimum_over_all_orders(g, cap)
    assert opt == 128
    assert split_bound(g, cap, 2, time_limit_s=10, num_workers=1).bytes == 0
    sb = span_bound(g, cap, 2, time_limit_s=10, num_workers=1, skip_fitting=False)
    assert sb.status == "optimal" and 0 < sb.bytes <= opt
    assert span_bound(g, cap, 2, time_limit_s=10, num_workers=1).bytes == sb.bytes  # that window does not fit


@pytest.mark.parametrize("maker,n,seed", [(random_branching_dag, 10, s) for s in range(4)] +
                         [(random_branching_dag, 12, 6), (random_dag, 12, 0), (random_dag, 12, 2)])
@pytest.mark.usefixtures("work_clock")
def test_span_bound_never_exceeds_the_optimum_over_all_orders(maker, n, seed):
    g = maker(n, seed)
    for cap in sorted({scratchpad_sizes(g).min_feasible, scratchpad_sizes(g).mid}):
        opt = optimum_over_all_orders(g, cap)
        for piece_ops in (1, 2, 3, 5):
            sb = span_bound(g, cap, piece_ops, time_limit_s=20, num_workers=1, skip_fitting=False)
            assert sb.status == "optimal"
            assert sb.bytes <= opt, (piece_ops, sb.pieces)


@pytest.mark.usefixtures("work_clock")
def test_the_check_catches_weights_that_add_up_to_more_than_one(monkeypatch):
    """Each window charged a tensor's full cost (weights adding up to 2 for T, held across q2 and q3 in
    1-op windows): the sum is then above the optimum, which the check above would report."""
    import memfit.plan.bound_span as bs

    g, cap = held_across()
    opt = optimum_over_all_orders(g, cap)
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False).bytes <= opt
    monkeypatch.setattr(bs, "weight", lambda windows: SCALE)
    assert span_bound(g, cap, 1, time_limit_s=10, num_workers=1, skip_fitting=False).bytes > opt


def test_the_live_rectangle_is_optional_and_takes_the_space():
    """In the whole-graph model a `through` tensor either takes its bytes from the first to the last of its ops
    or costs what it is given: here it cannot fit beside q2, so the optimum is its cost."""
    from memfit.plan.analysis import subgraph
    from memfit.plan.whole import WholeConfig, solve_whole

    g, cap = held_across()
    sub = subgraph(g, ["q2", "q3"])
    cheap = solve_whole(sub, cap, ["q2", "q3"], WholeConfig(10, 1, order_window=None), costed={},
                        through={"T": (["q2", "q3"], 64, 7)})
    roomy = solve_whole(sub, 256, ["q2", "q3"], WholeConfig(10, 1, order_window=None), costed={},
                        through={"T": (["q2", "q3"], 64, 7)})
    assert (cheap.status, cheap.objective_bytes) == ("optimal", 7)
    assert (roomy.status, roomy.objective_bytes) == ("optimal", 0)
