"""The planners' clock: wall time (the default), or work time, which does not stretch when the machine is loaded.

Every time limit in memfit.plan (a CP-SAT solve, a phase's share, a loop of min cuts) is read from the clock
in force (`current()`; `use(clock)` sets it for a block, as `make_plan` does). The wall clock is
`time.perf_counter`. The work clock counts, in seconds:

  * for each CP-SAT solve, CP-SAT's deterministic time (`CpSolver.deterministic_time`: a count of the work
    its workers did, the same whatever else runs on the machine); the solve is limited with
    `max_deterministic_time`;
  * for everything else (building models, min cuts, validation, Python loops), the CPU time of the calling
    thread (`time.thread_time`), which other processes do not inflate either.

So on a loaded machine a work-clock plan takes longer in wall time but does the same search, and two runs
compare. It is not bit-reproducible: CP-SAT's parallel workers still race, and thread CPU time varies by a
few percent. So that a plan cannot run away on a very loaded machine, the work clock never reads less than
`min_rate` x the wall time since it started (make_plan: the time limit over its wall cap, 1/3 by default), and
each solve also stops at its limit / min_rate of wall time; `capped` says the floor governed at some point.

Either clock can carry a hard end in wall time (`wall_end`, a `time.perf_counter()` reading; make_plan sets it to
the plan's start + its wall limit, less a reserve for the work after the last solve): no CP-SAT solve is given
more wall time than is left to it (`solves_cut` counts the solves it shortened), and `wall_left()` lets a loop or
a model build stop there. The phases' own shares (a bound's, a move's) never add up past the limit, but their
floors (at least 0.5 or 1 s each), CP-SAT's overshoot and the time spent building models could; the hard end is
what bounds the whole plan's wall time.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

if TYPE_CHECKING:  # OR-Tools is imported where a solve runs, not with this module
    from ortools.sat.python import cp_model

CLOCKS = ("wall", "work")


@dataclass
class Clock:
    kind: str = "wall"  # wall | work
    min_rate: float | None = None  # work clock: it reads at least min_rate x wall seconds (None: no floor)
    wall_end: float | None = None  # time.perf_counter() past which no solve runs (None: no hard end)
    _work: float = field(default=0.0, repr=False)  # work seconds counted so far (solves + thread CPU)
    _thread0: float = field(default_factory=time.thread_time, repr=False)
    _wall0: float = field(default_factory=time.perf_counter, repr=False)
    solver_s: float = 0.0  # work clock: CP-SAT deterministic time counted so far
    capped: bool = False  # work clock: the wall cap was reached
    solves_cut: int = 0  # solves whose wall limit the hard end shortened

    def __post_init__(self) -> None:
        if self.kind not in CLOCKS:
            raise ValueError(f"unknown clock {self.kind!r}; choose one of {', '.join(CLOCKS)}")

    def now(self) -> float:
        """Seconds on this clock (an arbitrary origin: only differences mean anything)."""
        if self.kind == "wall":
            return time.perf_counter()
        worked = self._worked()
        if self.min_rate is not None:
            floor = self.min_rate * (time.perf_counter() - self._wall0)
            if floor > worked:  # the machine is so loaded that wall time governs: the plan still ends in time
                self.capped = True
                return floor
        return worked

    def wall_left(self) -> float:
        """Wall seconds left to the hard end (inf without one; negative once past it)."""
        return math.inf if self.wall_end is None else self.wall_end - time.perf_counter()

    def left(self, deadline: float) -> float:
        """Seconds left to `deadline` (a reading of this clock), or to the hard end if that comes first (in wall
        seconds: the two are compared as they are, so a loop on the work clock stops at whichever ends first)."""
        return min(deadline - self.now(), self.wall_left())

    def _worked(self) -> float:
        return self._work + time.thread_time() - self._thread0

    def solve(self, solver: cp_model.CpSolver, model: cp_model.CpModel, seconds: float,
              callback: cp_model.CpSolverSolutionCallback | None = None) -> int:
        """CpSolver.Solve(model) limited to `seconds` on this clock; the status code CP-SAT returns."""
        seconds = max(0.01, float(seconds))
        # the solve's wall limit: its own on the wall clock, limit / min_rate on the work clock, and never past
        # the hard end
        wall = seconds if self.kind == "wall" else seconds / self.min_rate if self.min_rate is not None else None
        left = self.wall_left()
        if left < (math.inf if wall is None else wall):
            wall = max(0.01, left)
            self.solves_cut += 1
        if self.kind == "wall":
            solver.parameters.max_time_in_seconds = wall
            return solver.Solve(model, callback)
        solver.parameters.max_deterministic_time = seconds
        if wall is not None:
            solver.parameters.max_time_in_seconds = wall
        t0 = time.thread_time()
        code = solver.Solve(model, callback)
        # the solve counts as its deterministic time, not as the CPU its calling thread spent in it
        self._work += solver.deterministic_time - (time.thread_time() - t0)
        self.solver_s += solver.deterministic_time
        return code

    def summary(self) -> dict:
        out: dict = {"clock": self.kind}
        if self.wall_end is not None:
            out["solves_cut_at_wall_end"] = self.solves_cut
        if self.kind == "work":
            out.update({"work_s": round(self._worked(), 2), "cpsat_deterministic_s": round(self.solver_s, 2),
                        "wall_s": round(time.perf_counter() - self._wall0, 2), "wall_capped": self.capped})
        return out


_CURRENT: contextvars.ContextVar[Clock | None] = contextvars.ContextVar("memfit_plan_clock", default=None)


def current() -> Clock:
    """The clock in force: the one set by `use`, else a wall clock."""
    c = _CURRENT.get()
    return c if c is not None else _WALL


_WALL = Clock("wall")


@contextlib.contextmanager
def use(clock: Clock) -> Iterator[Clock]:
    """Make `clock` the planners' clock inside the block."""
    token = _CURRENT.set(clock)
    try:
        yield clock
    finally:
        _CURRENT.reset(token)
