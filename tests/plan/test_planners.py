import pytest

from memfit.plan.analysis import memory_aware_order, scratchpad_sizes
from memfit.plan.baselines import BASELINES, plan_baseline
from memfit.plan.errors import InfeasibleScratchpadError, PlanError
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.heuristic import choose_cuts, crossing_bytes
from memfit.plan.planner import PlanOptions, best_baseline, finish, make_plan
from memfit.plan.validate import validate
from tests.plan.graphs import order_matters, random_dag


def _caps(g):
    s = scratchpad_sizes(g)
    return sorted({s.min_feasible, s.mid, s.min_peak, s.min_peak + 64})


@pytest.mark.parametrize("seed", range(6))
def test_baselines_are_valid_at_every_size(seed):
    g = random_dag(30, seed)
    for cap in _caps(g):
        for cfg in BASELINES.values():
            plan = finish(plan_baseline(g, cap, cfg))
            assert plan.traffic == validate(plan)
            assert plan.traffic["non_compulsory_bytes"] >= 0


def test_no_traffic_when_everything_fits():
    g = random_dag(20, 1)
    total = sum(t.bytes for t in g.tensors)
    for cfg in BASELINES.values():
        assert finish(plan_baseline(g, total, cfg)).traffic["non_compulsory_bytes"] == 0


def test_infeasible_scratchpad_names_the_op():
    g = order_matters()  # c needs X + X2 = 20 bytes, the largest working set
    with pytest.raises(InfeasibleScratchpadError, match=r"operator 'c' needs 20 bytes") as info:
        make_plan(g, 19, PlanOptions(planner="baseline-topo"))
    assert info.value.needed_bytes == 20 and "--scratchpad 20" in str(info.value)


def test_unknown_planner():
    with pytest.raises(PlanError, match="unknown planner"):
        make_plan(order_matters(), 100, PlanOptions(planner="magic"))


def test_exact_reorders_to_avoid_a_spill():
    g = order_matters()
    topo = finish(plan_baseline(g, 21, BASELINES["baseline-topo"]))
    assert topo.traffic["non_compulsory_bytes"] > 0  # the framework order must spill Y
    plan = make_plan(g, 21, PlanOptions(planner="exact", time_limit_s=10, free_order=True))
    assert plan.solver.status == "optimal"
    assert plan.traffic["non_compulsory_bytes"] == 0 and plan.solver.gap == 0.0
    assert plan.order.index("c") < plan.order.index("b")


@pytest.mark.parametrize("seed", range(4))
def test_exact_is_valid_optimal_and_no_worse_than_baselines(seed):
    g = random_dag(12, seed)
    for cap in _caps(g)[:3]:
        best, _ = best_baseline(g, cap)
        plan = make_plan(g, cap, PlanOptions(planner="exact", time_limit_s=20, num_workers=2, free_order=True))
        assert plan.traffic == validate(plan)
        assert plan.solver.status == "optimal"
        assert plan.traffic["non_compulsory_bytes"] <= best.traffic["non_compulsory_bytes"]
        assert plan.solver.bound_bytes == plan.traffic["non_compulsory_bytes"]
        # the CP-SAT objective counts exactly the traffic the validator derives from the placements
        assert plan.solver.details["model_objective_bytes"] == plan.traffic["non_compulsory_bytes"]


def test_exact_fixed_order_matches_model_count():
    g = random_dag(25, 7)
    cap = scratchpad_sizes(g).min_feasible
    order = memory_aware_order(g)
    res = solve_segment(g, cap, Segment(order), ExactConfig(time_limit_s=20))
    assert res.status == "optimal"
    from memfit.plan.plan_format import Plan
    plan = finish(Plan(g, cap, res.order, res.placements))
    assert plan.traffic["non_compulsory_bytes"] == res.objective_bytes


def test_choose_cuts_respects_lengths_and_prefers_cheap_cuts():
    cross = [0, 9, 9, 1, 9, 9, 9, 2, 9, 9]
    cuts = choose_cuts(cross, min_ops=2, max_ops=4)
    lengths = [b - a for a, b in zip(cuts, cuts[1:] + [len(cross)])]
    assert cuts[0] == 0 and all(2 <= n <= 4 for n in lengths)
    assert cuts == [0, 3, 7]
    assert choose_cuts(cross, 2, 20) == [0]


@pytest.mark.parametrize("seed", range(3))
def test_heuristic_valid_and_no_worse_than_seed(seed):
    g = random_dag(45, seed)
    cross = crossing_bytes(g, g.topo_order())
    assert len(cross) == len(g.ops) and cross[0] == 0
    for cap in _caps(g)[:3]:
        best, _ = best_baseline(g, cap)
        plan = make_plan(g, cap, PlanOptions(planner="heuristic", time_limit_s=6, max_segment_ops=10))
        assert plan.traffic == validate(plan)
        d = plan.solver.details
        assert d.get("seed_meets_bound") or d["passes"][0]["segments"] >= 4  # first pass: 10-op segments
        assert plan.traffic["non_compulsory_bytes"] <= best.traffic["non_compulsory_bytes"]


def test_heuristic_stitching_is_consistent_with_segment_costs():
    """Without the seed fallback, the stitched plan's traffic is what the segment models paid (or less, after
    merging touching placements)."""
    from memfit.plan.heuristic import HeuristicConfig, plan_segments
    from memfit.plan.plan_format import Plan
    g = random_dag(40, 11)
    cap = scratchpad_sizes(g).min_feasible
    order, placements, stats = plan_segments(g, cap, memory_aware_order(g), HeuristicConfig(8, 10, 5))
    plan = finish(Plan(g, cap, order, placements))
    assert stats["segments"] >= 4 and stats["fallback_segments"] == 0
    assert plan.traffic["non_compulsory_bytes"] <= stats["segment_objective_bytes"]


def _seed_copy(base):
    """The seed plan as a new order and new placements, as a search that found nothing better returns it."""
    from memfit.plan.plan_format import Placement

    return list(base.order), [Placement(p.tensor, p.offset, p.start, p.end) for p in base.placements]


@pytest.mark.parametrize("planner", ["exact", "heuristic", "whole"])
def test_a_returned_seed_is_labelled_as_the_seed(planner, monkeypatch):
    """Issue 22: a plan is named after what produced it. When the search finds nothing better than its seed
    (here every search step is patched to hand the seed back, as copies), the plan carries the seed's own
    name, not the requested planner's; and when the seed already meets the bound, likewise."""
    import memfit.plan.planner as planner_mod
    import memfit.plan.whole_search as whole_search
    from memfit.plan.exact import SegmentResult
    from memfit.plan.planner import best_seed

    g = random_dag(30, 1)
    s = scratchpad_sizes(g)
    cap = s.min_feasible
    base = best_seed(g, cap)
    nc = base.traffic["non_compulsory_bytes"]
    assert nc > 0  # something to improve, so the search runs
    monkeypatch.setattr(planner_mod, "solve_segment", lambda *a, **k: SegmentResult(
        *_seed_copy(base), "feasible", nc, 0, 0.0, {}))
    monkeypatch.setattr(planner_mod, "plan_passes", lambda *a, **k: (*_seed_copy(base), {}))
    monkeypatch.setattr(planner_mod, "lns_passes", lambda *a, **k: (*_seed_copy(base), {}))
    monkeypatch.setattr(whole_search, "search", lambda *a, **k: (*_seed_copy(base), {"final": {"status": "feasible"}}))
    plan = make_plan(g, cap, PlanOptions(planner=planner, time_limit_s=5, num_workers=1, bound=False))
    assert plan.traffic == validate(plan) and plan.traffic["non_compulsory_bytes"] == nc
    assert plan.planner == base.planner != planner
    assert plan.solver.details["requested_planner"] == planner
    assert plan.solver.details["produced_by"] == base.planner
    monkeypatch.undo()
    # at the spill-free size every seed moves nothing, which meets any bound: the seed is returned as it is
    top = best_seed(g, s.min_peak)
    assert top.traffic["non_compulsory_bytes"] == 0
    plan = make_plan(g, s.min_peak, PlanOptions(planner=planner, time_limit_s=5, num_workers=1))
    assert plan.planner == top.planner and plan.solver.details["requested_planner"] == planner
    assert plan.solver.status == "optimal" and plan.traffic["non_compulsory_bytes"] == 0


@pytest.mark.parametrize("planner", ["whole", "heuristic"])
def test_the_split_bound_proves_the_seed_optimal_and_the_search_is_skipped(planner):
    """A branching cell where the row bounds (min cut, every-order, cover, order pairs) stay below the best
    seed, and the split bound with one piece (the whole graph, order free: the optimum itself) reaches it: the
    planner returns the seed as proven optimal by the split bound (or the span bound, run first, which with one
    piece is the optimum too), without searching. Without them the same plan is left with a gap. The optimum is checked independently (per-step exact model, order free)."""
    from memfit.plan.planner import best_seed
    from tests.plan.graphs import random_branching_dag

    g = random_branching_dag(10, 6)
    cap = scratchpad_sizes(g).min_feasible
    seed_nc = best_seed(g, cap).traffic["non_compulsory_bytes"]
    opt = solve_segment(g, cap, Segment(best_seed(g, cap).order, free_order=True), ExactConfig(30, 1))
    assert opt.status == "optimal" and opt.objective_bytes == seed_nc > 0
    opts = dict(planner=planner, time_limit_s=20, num_workers=1, split_piece_ops=len(g.ops))
    off = make_plan(g, cap, PlanOptions(**opts, split_bound_share=0.0))
    rows = off.solver.details["lower_bound"]
    assert not {"span", "split"} & set(rows["parts"]) and rows["bytes"] < seed_nc  # the row bounds leave a gap
    assert off.solver.status != "optimal" and off.solver.gap > 0
    plan = make_plan(g, cap, PlanOptions(**opts))
    d = plan.solver.details
    assert plan.traffic == validate(plan) and plan.traffic["non_compulsory_bytes"] == seed_nc
    assert plan.solver.bound_bytes == seed_nc and plan.solver.gap == 0.0 and plan.solver.status == "optimal"
    # with one piece the span bound (run first) is the optimum too, and the split bound is then not needed
    assert d["lower_bound"]["best_part"] == d["proven_by_bound"] in ("span", "split")
    assert d["lower_bound"]["parts"][d["proven_by_bound"]]["bytes"] == seed_nc
    assert d["seed_meets_bound"] and "order_search" not in d and "windows" not in d  # no search ran
