"""Baselines that do not collapse: local fallback, two packings, the budget ladder, online Belady."""
import pytest

from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.baselines import BASELINES, ideal_belady_bytes, plan_baseline, residency
from memfit.plan.packing import pack, pack_local_fallback, split_at
from memfit.plan.plan_format import OpSpec, Plan, TensorSpec, build_graph
from memfit.plan.planner import PlanOptions, finish, make_plan
from memfit.plan.validate import validate
from tests.plan.graphs import per_step_plan, random_branching_dag, random_dag


def _resident_at(plan: Plan, step: int) -> set[str]:
    return {p.tensor for p in plan.placements if p.start <= step <= p.end}


def _per_step_traffic(g) -> int:
    """The old whole-graph fallback's traffic as the validator counts it."""
    order, placements = per_step_plan(g)
    return validate(Plan(g, sum(x.bytes for x in g.tensors), order, placements))["non_compulsory_bytes"]


def test_split_at_cuts_and_trims_to_uses():
    uses = {"a": [0, 2, 5, 7], "b": [3, 4]}
    got = split_at([("a", 0, 7), ("b", 3, 4)], uses, [4])
    # a: pieces 0..2 (uses 0, 2) and 5..7; not used at 4 so no one-step piece; b: 3..3, then 4..4 at the cut
    assert sorted(got) == [("a", 0, 2), ("a", 5, 7), ("b", 3, 3), ("b", 4, 4)]


@pytest.mark.parametrize("seed", range(4))
def test_local_fallback_evicts_only_at_the_failing_steps(seed):
    g = random_branching_dag(40, seed)
    cap = scratchpad_sizes(g).min_feasible
    order = g.topo_order()
    intervals = residency(g, order, 1 << 40)  # no eviction at all: far too much to pack at this size
    assert pack(g, intervals, cap)[1], "the test needs intervals that do not fit"
    for packing in ("size", "breadth"):
        got = pack_local_fallback(g, order, intervals, cap, packing)
        plan = finish(Plan(g, cap, order, got.placements))
        assert 0 < len(got.split_steps) < len(order)  # local: not every step
        for t in got.split_steps:  # at a split step only the op's own tensors are resident
            o = g.op[order[t]]
            assert _resident_at(plan, t) == set(o.inputs) | set(o.outputs)
        assert plan.traffic["non_compulsory_bytes"] < _per_step_traffic(g)


@pytest.mark.parametrize("seed", range(5))
def test_baselines_at_min_feasible_report_fallback_and_beat_per_step(seed):
    g = random_branching_dag(50, seed)
    cap = scratchpad_sizes(g).min_feasible  # the size at which the old budget search had an empty range
    per_step = _per_step_traffic(g)
    for name, cfg in BASELINES.items():
        plan = finish(plan_baseline(g, cap, cfg))
        d = plan.solver.details
        assert plan.planner == name and isinstance(d["fell_back"], bool)
        assert d["fell_back"] == (d["fallback_steps"] > 0)
        assert d["fallback_steps"] < len(g.ops)
        for t in d.get("fallback_at", []):
            o = g.op[plan.order[t]]
            assert _resident_at(plan, t) == set(o.inputs) | set(o.outputs)
        assert plan.traffic["non_compulsory_bytes"] < per_step


def _belady_trap():
    """12 bytes. At op3 (needs b and c) one of a (4 bytes, next read at op5) or x (2 bytes, next read at op4)
    must go: Belady evicts a, the furthest next use, which costs a store and a reload (8 bytes); reloading
    the input x costs 2, and a then stays resident through op4 (x, c, d and a: 12 bytes)."""
    t = [TensorSpec(n, b, k) for n, b, k in (("x", 2, "input"), ("a", 4, "activation"), ("b", 4, "activation"),
                                            ("c", 4, "activation"), ("d", 2, "activation"), ("out", 4, "output"))]
    ops = [OpSpec("op1", ["x"], ["a"]), OpSpec("op2", ["a"], ["b"]), OpSpec("op3", ["b"], ["c"]),
           OpSpec("op4", ["x", "c"], ["d"]), OpSpec("op5", ["a", "d"], ["out"])]
    return build_graph("belady_trap", t, ops)


def test_online_belady_hand_count_and_exact_beats_it():
    g = _belady_trap()
    plan = make_plan(g, 12, PlanOptions(planner="baseline-belady"))
    assert plan.traffic == validate(plan)
    assert plan.traffic["non_compulsory_bytes"] == 8 and plan.traffic["spill_bytes"] == 4
    assert ideal_belady_bytes(g, g.topo_order(), 12) == 8
    exact = make_plan(g, 12, PlanOptions(planner="exact", time_limit_s=10, free_order=False, bound=False))
    assert exact.solver.status in ("optimal", "optimal-fixed-order") and exact.traffic["non_compulsory_bytes"] == 2


@pytest.mark.parametrize("seed", range(4))
def test_online_belady_valid_and_matches_ideal_with_equal_sizes(seed):
    """With every tensor the same size and the scratchpad a whole number of slots, addresses cannot
    fragment, so Belady with online addresses moves exactly what Belady without addresses moves."""
    g = random_branching_dag(40, seed, sizes=(64,))
    for slots in (4, 6, 9):
        cap = max(scratchpad_sizes(g).min_feasible, 64 * slots)
        plan = finish(plan_baseline(g, cap, BASELINES["baseline-belady"]))
        assert plan.solver.details["relocations"] == 0
        assert plan.traffic["non_compulsory_bytes"] == ideal_belady_bytes(g, g.topo_order(), cap)


@pytest.mark.parametrize("seed", range(3))
def test_every_baseline_valid_on_chains_and_branches(seed):
    for g in (random_dag(40, seed), random_branching_dag(40, seed)):
        s = scratchpad_sizes(g)
        for cap in sorted({s.min_feasible, s.mid, s.min_peak}):
            for cfg in BASELINES.values():
                plan = finish(plan_baseline(g, cap, cfg))
                assert plan.traffic == validate(plan)
                if cap >= sum(t.bytes for t in g.tensors):
                    assert plan.traffic["non_compulsory_bytes"] == 0
