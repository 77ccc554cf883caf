"""The planners' clock (memfit.plan.clock): the work clock counts CP-SAT's deterministic time and the thread's CPU
time, not waiting; its limit is the one CP-SAT reports keeping; the wall cap still stops a run."""
from __future__ import annotations

import time

import pytest

from memfit.plan.clock import Clock, current, use


def _hard_model(n: int = 11):
    """A Golomb ruler of n marks, shortest first: CP-SAT takes minutes to prove it at n = 11, so a solve limited
    to a fraction of a second stops at the limit."""
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    x = [m.NewIntVar(0, n * n, f"x{i}") for i in range(n)]
    m.Add(x[0] == 0)
    for a, b in zip(x, x[1:]):
        m.Add(b > a)
    diffs = []
    for i in range(n):
        for j in range(i + 1, n):
            d = m.NewIntVar(1, n * n, f"d{i}_{j}")
            m.Add(d == x[j] - x[i])
            diffs.append(d)
    m.AddAllDifferent(diffs)
    m.Minimize(x[-1])
    return m


def test_waiting_does_not_advance_the_work_clock_but_advances_the_wall_clock():
    work, wall = Clock("work"), Clock("wall")
    w0, t0 = work.now(), wall.now()
    time.sleep(0.3)  # another process holding the CPU looks like this to the planner: time passes, no work done
    assert wall.now() - t0 >= 0.3
    assert work.now() - w0 < 0.05


def test_a_solve_counts_its_deterministic_time_under_the_limit_cp_sat_reports():
    from ortools.sat.python import cp_model

    clock = Clock("work")
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    w0 = clock.now()
    code = clock.solve(solver, _hard_model(), 0.2)
    assert code in (cp_model.FEASIBLE, cp_model.UNKNOWN)  # stopped by the limit, not proven
    assert solver.parameters.max_deterministic_time == pytest.approx(0.2)
    # CP-SAT's own count of the work done: at the limit (it checks it between steps), and what the clock adds
    assert 0.15 <= solver.deterministic_time <= 0.4
    assert clock.now() - w0 == pytest.approx(solver.deterministic_time, abs=0.05)
    assert clock.summary()["cpsat_deterministic_s"] == pytest.approx(solver.deterministic_time, abs=0.01)


def test_the_wall_clock_limits_a_solve_by_wall_time():
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    code = Clock("wall").solve(solver, _hard_model(), 0.3)
    assert solver.parameters.max_time_in_seconds == pytest.approx(0.3)
    # stopped by the limit, not by a proof (the ruler takes minutes unlimited): no optimum is claimed
    assert code in (cp_model.FEASIBLE, cp_model.UNKNOWN)


def test_on_a_loaded_machine_the_wall_time_floor_governs_and_durations_stay_sane():
    clock = Clock("work", min_rate=0.5)
    t0 = time.perf_counter()
    w0 = clock.now()
    time.sleep(0.4)  # no work done, at least 0.4 s of wall time: the floor reads half the wall time
    w1 = clock.now()
    wall = time.perf_counter() - t0  # measured, so an overrun of the sleep on a loaded machine is allowed for
    assert 0.19 <= w1 - w0 <= 0.5 * wall + 0.02 and clock.capped and clock.summary()["wall_capped"]
    assert not Clock("work", min_rate=0.5).capped


def test_use_sets_the_clock_for_the_block_only():
    assert current().kind == "wall"
    with use(Clock("work")) as c:
        assert current() is c
    assert current().kind == "wall"
    with pytest.raises(ValueError, match="unknown clock"):
        Clock("cpu")


def test_a_plan_on_the_work_clock_is_valid_and_says_what_work_it_did():
    from memfit.plan.analysis import scratchpad_sizes
    from memfit.plan.planner import PlanOptions, best_seed, make_plan
    from tests.plan.graphs import random_branching_dag

    g = random_branching_dag(30, 1)
    cap = scratchpad_sizes(g).min_feasible
    plan = make_plan(g, cap, PlanOptions(planner="whole", time_limit_s=2, num_workers=1, clock="work", wall_cap_s=60))
    c = plan.solver.details["clock"]
    assert c["clock"] == "work" and not c["wall_capped"] and c["work_s"] > 0
    assert plan.traffic["non_compulsory_bytes"] <= best_seed(g, cap).traffic["non_compulsory_bytes"]
    assert current().kind == "wall"  # make_plan put the wall clock back
