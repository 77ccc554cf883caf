"""Fixtures shared by the planner's bound tests."""
import pytest

from memfit.plan.clock import Clock, use


@pytest.fixture
def work_clock():
    """Limits count CP-SAT's work, not wall time: the bound tests ask for proofs (status optimal) within a limit,
    which 20-30 s of wall time did not give at load 8-10 on 2 cores (memfit.plan.clock)."""
    with use(Clock("work")) as c:
        yield c
