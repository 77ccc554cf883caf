"""benchmarks/plan_split_bound: the split bound beside a plan's figures; the larger bound kept, and a bound above
the plan an error, not a clamp."""
from __future__ import annotations

import pytest

from benchmarks.plan_split_bound import case_bound
from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.bound_split import split_bound
from memfit.plan.errors import BoundViolationError
from memfit.plan.planner import PlanOptions, make_plan
from tests.plan.graphs import random_branching_dag


def test_case_bound_keeps_the_larger_bound_and_rejects_one_above_the_plan():
    g = random_branching_dag(12, 2)  # min-feasible: 640 bytes optimal, 512 by 4-op pieces
    cap = scratchpad_sizes(g).min_feasible
    plan = make_plan(g, cap, PlanOptions(planner="exact", time_limit_s=20, num_workers=1))
    nc = plan.traffic["non_compulsory_bytes"]
    split = split_bound(g, cap, 4, 10, 1).bytes
    assert 0 < split <= nc
    case = {"ops": len(g.ops), "non_compulsory_bytes": nc, "bound_bytes": 0, "best_baseline_bytes": 2 * nc,
            "reduction_vs_best_baseline": 0.5}
    c = case_bound(g, cap, case, [4], 10, 1)
    assert c["split_bound_bytes"] == split == c["bound_bytes"]
    assert c["max_possible_reduction"] == round(1 - split / (2 * nc), 4) and c["max_possible_reduction_before"] == 1.0
    assert case_bound(g, cap, {**case, "bound_bytes": nc}, [4], 10, 1)["bound_bytes"] == nc
    with pytest.raises(BoundViolationError):  # a "plan" moving less than the proven bound
        case_bound(g, cap, {**case, "non_compulsory_bytes": split - 1}, [4], 10, 1)
