"""Depth-first candidate orders, seeds, window re-solving (LNS) and the graph cache."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.heuristic import HeuristicConfig, improve_windows
from memfit.plan.orders import candidate_orders, dfs_order
from memfit.plan.plan_format import OpSpec, Plan, TensorSpec, build_graph
from memfit.plan.planner import PlanOptions, best_baseline, best_seed, make_plan
from memfit.plan.validate import validate
from tests.plan.graphs import per_step_plan, random_branching_dag


def _topological(g, order):
    step = {o: i for i, o in enumerate(order)}
    return sorted(order) == sorted(g.op) and all(
        step[g.tensor[n].producer] < step[o.name] for o in g.ops for n in o.inputs if g.tensor[n].producer)


@pytest.mark.parametrize("seed", range(4))
def test_candidate_orders_are_topological(seed):
    g = random_branching_dag(60, seed)
    for name, order in candidate_orders(g).items():
        assert _topological(g, order), name


def test_dfs_finishes_a_branch_before_the_next():
    t = [TensorSpec("x", 4, "input")] + [TensorSpec(n, 4, "activation") for n in ("a1", "a2", "a3", "b1", "b2")]
    t.append(TensorSpec("y", 4, "output"))
    ops = [OpSpec("A1", ["x"], ["a1"]), OpSpec("B1", ["x"], ["b1"]), OpSpec("A2", ["a1"], ["a2"]),
           OpSpec("B2", ["b1"], ["b2"]), OpSpec("A3", ["a2"], ["a3"]), OpSpec("J", ["a3", "b2"], ["y"])]
    g = build_graph("two_branches", t, ops)
    order = dfs_order(g, lambda p: p)  # visit J's inputs by name: branch A first
    assert order == ["A1", "A2", "A3", "B1", "B2", "J"]


@pytest.mark.parametrize("seed", range(3))
def test_windows_improve_a_poor_plan_and_stay_valid(seed):
    g = random_branching_dag(36, seed)
    cap = scratchpad_sizes(g).mid
    order, placements = per_step_plan(g)  # reloads everything at every step
    start = validate(Plan(g, cap, order, placements))["non_compulsory_bytes"]
    new_order, new_pl, st = improve_windows(g, cap, order, placements, HeuristicConfig(20, 12, 6))
    got = validate(Plan(g, cap, new_order, new_pl))["non_compulsory_bytes"]
    assert st["windows"] >= 3 and st["windows_improved"] >= 1
    assert got == st["end_bytes"] < start == st["start_bytes"]
    # the window path of the planner starts from the best seed instead, and never returns more than it
    assert best_baseline(g, cap)[0].traffic["non_compulsory_bytes"] >= best_seed(g, cap).traffic["non_compulsory_bytes"]


def test_large_graphs_take_the_window_path_and_never_lose_to_the_seed():
    g = random_branching_dag(50, 1)
    cap = scratchpad_sizes(g).min_feasible
    seed = best_seed(g, cap)
    plan = make_plan(g, cap, PlanOptions(planner="heuristic", time_limit_s=6, free_segments_max_ops=10,
                                         bound=False))
    assert plan.traffic == validate(plan)
    assert plan.solver.details.get("method", "").startswith("windows")
    assert plan.traffic["non_compulsory_bytes"] <= seed.traffic["non_compulsory_bytes"]


def test_graph_cache_reads_back_without_extracting(tmp_path, monkeypatch):
    from memfit.plan import graph as graph_mod
    from memfit.plan.graph_cache import cache_dir, cached_graph

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    g = cached_graph("bert_tiny_encoder", batch=2, dtype="float16")
    assert list(cache_dir().glob("bert_tiny_encoder_b2_float16-*.json"))

    def no_extract(*a, **k):
        raise AssertionError("extracted again instead of reading the cache")

    monkeypatch.setattr(graph_mod, "graph_from_name", no_extract)
    again = cached_graph("bert_tiny_encoder", batch=2, dtype="float16")
    assert again.to_dict() == g.to_dict()
    assert [t.consumers for t in again.tensors] == [t.consumers for t in g.tensors]
