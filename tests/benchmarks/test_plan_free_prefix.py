"""benchmarks/plan_free_prefix: the whole model with the seed's first steps free returns a valid plan moving no
more than the seed, and calls it optimal only when it moves nothing."""
from __future__ import annotations

from benchmarks.plan_free_prefix import free_prefix
from memfit.plan.analysis import scratchpad_sizes
from memfit.plan.planner import seed_plans
from tests.plan.graphs import random_branching_dag


def test_free_prefix_is_valid_and_no_worse_than_the_seed():
    g = random_branching_dag(20, 3)
    cap = scratchpad_sizes(g).min_feasible
    c = free_prefix(g, cap, 12, 10, 1)
    seed = seed_plans(g, cap)[0].traffic["non_compulsory_bytes"]
    assert c["seed_non_compulsory_bytes"] == seed > 0 and c["free_steps"] == [0, 12]
    if c["status"] in ("optimal", "feasible"):  # asked for less than the seed: found, or proven none
        assert c["non_compulsory_bytes"] < seed and c["proven_optimal"] == (c["non_compulsory_bytes"] == 0)
    else:
        assert c["status"] in ("infeasible", "none") and "traffic" not in c


def test_a_reorder_that_removes_every_spill_is_found_and_called_optimal():
    g = random_branching_dag(12, 4)  # at 488 bytes the best seed moves 192 bytes; some order moves nothing
    c = free_prefix(g, 488, 12, 20, 1)
    assert c["seed_non_compulsory_bytes"] > 0
    assert c["status"] == "optimal" and c["non_compulsory_bytes"] == 0 and c["proven_optimal"]
    assert c["traffic"]["spill_bytes"] == c["traffic"]["reload_bytes"] == 0
