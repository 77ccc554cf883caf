"""The exact planner for whole graphs: one CP-SAT model over every op, with lifetimes as interval variables and
the scratchpad as a NoOverlap2D of address x time rectangles.

Why it scales where `exact.py` does not: `exact.py` has a residency Boolean and an offset per tensor *per step*
(O(tensors x steps) variables, too many past ~40 ops). Here a tensor has one rectangle per *use*:

  * a use is the producer's step or a consumer's step; the rectangle of use u covers time [start_u, s_u + 1),
    address [a_u, a_u + size);
  * `keep_u` says the tensor stayed resident since its previous use (its "prev"): then start_u = s_prev + 1
    and a_u = a_prev, so the two rectangles join into one residency; otherwise start_u = s_u and the tensor
    is loaded at u (after a store, for an activation);
  * all rectangles of all tensors go into one AddNoOverlap2D, with a cumulative over time as a redundant cut.

Dropping a tensor right after a use and reloading it exactly at its next use is never worse than anything
else (it frees the bytes earliest and reloads them latest), so for a given order this model is exact for the
memfit.plan/v1 traffic rules: a dropped gap costs 2 x bytes for an activation/output (spill store + reload)
and 1 x bytes for an input/weight (reload; its first load is compulsory).

Order: op steps s_o are integer variables under AllDifferent and the graph's precedences. `order_window`
0 fixes the hint's order (every rectangle has a fixed time span), k lets each op move k steps from its hint
position, None leaves the order free. Which use comes before which is a Boolean only where neither the
graph nor the step domains decide it (memfit.plan.whole_uses), so a fixed order builds a plain model.

Symmetry breaking: interchangeable tensors (same size, kind and uses) take increasing addresses at their
first use, interchangeable ops (same inputs, same output sizes, same readers) keep their hint order.
The hint is a complete plan (the heuristic's), given to CP-SAT with AddHint; a solution callback records
each improvement. The objective bound CP-SAT proves holds for the model's scope only (this order, this
window, or all orders), and the status says which.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from memfit.plan.clock import current
from memfit.plan.errors import BoundViolationError
from memfit.plan.exact import address_unit
from memfit.plan.plan_format import Graph, Placement
from memfit.plan.whole_uses import UseModel


@dataclass
class WholeConfig:
    time_limit_s: float = 30.0
    num_workers: int = 2
    order_window: int | None = 0  # 0: the hint's order; k: each op within k steps of it; None: any order
    free_range: tuple[int, int] | None = None  # (i, j): only the ops at steps i..j-1 reorder (among themselves)
    seed: int = 0
    log: bool = False


@dataclass
class WholeResult:
    order: list[str]
    placements: list[Placement]
    status: str  # optimal | feasible | none | infeasible (optimal within `scope`; infeasible: nothing below below_bytes)
    objective_bytes: int  # non-compulsory bytes of the returned plan, by the model's count (-1: none)
    bound_bytes: int  # CP-SAT's proven lower bound, valid within `scope`
    scope: str  # "fixed order" | "order window +-k" | "all orders"
    time_s: float
    solutions: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) per improvement
    stats: dict = field(default_factory=dict)


def scope_name(window: int | None, n_ops: int, free_range: tuple[int, int] | None = None) -> str:
    if free_range is not None:
        return f"fixed order outside steps {free_range[0]}..{free_range[1] - 1}"
    if window is None or window >= n_ops:
        return "all orders"
    return "fixed order" if window == 0 else f"order window +-{window}"


def solve_whole(g: Graph, capacity: int, order: list[str], cfg: WholeConfig,
                hint: list[Placement] | None = None, floor_bytes: int = 0,
                below_bytes: int | None = None, frozen: set[str] | None = None,
                costed: set[str] | dict[str, int] | None = None,
                through: dict[str, tuple[list[str], int, int]] | None = None,
                precedes: list[tuple[str, str]] = ()) -> WholeResult:
    """Plan all of `g` in `capacity` bytes. `order`: a valid order (the hint's, or the fixed one); `hint`: a
    valid plan's placements under `order` (CP-SAT starts from it). floor_bytes: a proven lower bound on the
    non-compulsory bytes, added as a cut so the solve can stop once a plan meets it. below_bytes: only plans
    moving less are wanted (a search move): status "infeasible" then proves there is none in this scope.
    frozen: tensors whose spill decisions and addresses stay as in the hint (a search move's neighbourhood).
    costed: only these tensors' traffic is counted (None: all); the others still take space at their uses and
    move for free; a dict gives each named tensor its cost per dropped gap instead (memfit.plan.bound_span).
    Symmetry breaking is then off: tensors or ops that look interchangeable may differ in cost, and a bound over
    a symmetry-reduced space would not be valid (memfit.plan.bound_split relies on this).
    through: name -> (ops, bytes, cost) of tensors outside `g` that are live at those ops: one optional
    rectangle from the first to the last of them at one address, `cost` when absent (memfit.plan.bound_span).
    precedes: (a, b) pairs of ops, a runs before b, beside the graph's own (order free only)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    clock = current()
    c0 = clock.now()
    if clock.wall_left() <= 0:  # the plan's hard end (memfit.plan.clock) has passed: no model is built
        return WholeResult([], [], "none", -1, 0, scope_name(cfg.order_window, len(g.ops), cfg.free_range), 0.0,
                           stats={"skipped": "past the plan's wall end"})
    m = cp_model.CpModel()
    unit = math.gcd(address_unit(g), *[b for _, b, _ in (through or {}).values()])
    cap_u = capacity // unit
    um = UseModel(g, m, order, cfg.order_window, cfg.free_range, precedes)
    xs, ys, demands = [], [], []
    objective = 0
    addr: dict[tuple[str, str], object] = {}
    for t in g.tensors:
        uses = um.uses(t.name)
        su = t.bytes // unit
        for u in uses:
            addr[(t.name, u)] = m.NewIntVar(0, cap_u - su, f"a[{t.name},{u}]")
        for u in uses:
            first, prevs = um.prev_of(t.name, u)  # first: 1/0/literal; prevs: [(use, is_prev 1/literal)]
            keep = 0
            if prevs:
                keep = um.keep[(t.name, u)] = m.NewBoolVar(f"keep[{t.name},{u}]")
                if not isinstance(first, int):
                    m.AddImplication(keep, first.Not())  # the first use has nothing to keep from
                for p, is_prev in prevs:
                    lits = [keep] + ([] if isinstance(is_prev, int) else [is_prev])
                    m.Add(addr[(t.name, u)] == addr[(t.name, p)]).OnlyEnforceIf(lits)
                if costed is not None and t.name not in costed:
                    pass  # takes its space, moves for free
                elif t.kind in ("activation", "output"):  # spill store + reload
                    objective += (costed[t.name] if isinstance(costed, dict) else 2 * t.bytes) * (1 - keep)
                else:  # input/weight: a reload unless kept or the first (compulsory) load
                    objective += (costed[t.name] if isinstance(costed, dict) else t.bytes) * (1 - keep - first)
            for x_iv in um.rectangles(t.name, u, keep, prevs):
                xs.append(x_iv)
                ys.append(m.NewFixedSizeIntervalVar(addr[(t.name, u)], su, f"y[{t.name},{u}]"))
                demands.append(su)
    for name, (ops, size, cost) in (through or {}).items():  # live across `ops`: kept from the first to the last
        inn, su, lo, hi = m.NewBoolVar(f"in[{name}]"), size // unit, min(um.dom[o][0] for o in ops), max(
            um.dom[o][1] for o in ops)
        if su > cap_u:  # can never be kept
            m.Add(inn == 0)
            su = cap_u
        first_s, last_s = m.NewIntVar(lo, hi, f"first[{name}]"), m.NewIntVar(lo, hi, f"last[{name}]")
        m.AddMinEquality(first_s, [um.s[o] for o in ops])
        m.AddMaxEquality(last_s, [um.s[o] for o in ops])
        span = m.NewIntVar(1, hi - lo + 1, f"span[{name}]")
        m.Add(span == last_s + 1 - first_s)
        xs.append(m.NewOptionalIntervalVar(first_s, span, last_s + 1, inn, f"x[{name}]"))
        ys.append(m.NewOptionalFixedSizeIntervalVar(m.NewIntVar(0, cap_u - su, f"a[{name}]"), su, inn, f"y[{name}]"))
        demands.append(su)
        objective += cost * (1 - inn)
    m.AddNoOverlap2D(xs, ys)
    m.AddCumulative(xs, demands, cap_u)  # redundant: the bytes resident at a step fit (a strong LP cut)
    m.Minimize(objective)
    if floor_bytes > 0 and not isinstance(objective, int):
        m.Add(objective >= floor_bytes)  # valid cut from a proven bound: lets CP-SAT prove optimality sooner
    if below_bytes is not None:
        m.Add(objective < below_bytes)
    hint_addr = um.add_hint(hint, addr, unit) if hint is not None else None
    if frozen and hint_addr is not None:
        um.freeze(frozen, addr, hint_addr)
    if costed is None:
        um.break_symmetry(addr, hint_addr)
    stats = {"rectangles": len(xs), "step_vars": um.n_step_vars, "order_literals": len(um.before_vars),
             "build_s": round(time.perf_counter() - t0, 3)}

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(cfg.num_workers)
    solver.parameters.random_seed = int(cfg.seed)
    solver.parameters.log_search_progress = bool(cfg.log)
    rec = _recorder(t0)
    code = clock.solve(solver, m, max(0.1, float(cfg.time_limit_s) - (clock.now() - c0)), rec)
    elapsed = time.perf_counter() - t0
    scope = scope_name(cfg.order_window, len(g.ops), cfg.free_range)
    stats["conflicts"] = solver.NumConflicts()
    stats["deterministic_s"] = round(solver.deterministic_time, 3)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        infeasible = code == cp_model.INFEASIBLE
        bound = max(0, math.ceil(solver.BestObjectiveBound() - 1e-6)) if not infeasible else -1
        return WholeResult([], [], "infeasible" if infeasible else "none", -1, bound, scope, elapsed,
                           rec.solutions, stats)
    order_out, placements = um.extract(solver, addr, unit)
    obj = round(solver.ObjectiveValue())
    bound = max(0, math.ceil(solver.BestObjectiveBound() - 1e-6))
    if bound > obj:  # CP-SAT's bound never exceeds its own objective; anything else is a modelling bug
        raise BoundViolationError("whole-graph model", bound, obj)
    status = "optimal" if code == cp_model.OPTIMAL else "feasible"
    return WholeResult(order_out, placements, status, obj, bound, scope, elapsed, rec.solutions, stats)


def _recorder(t0: float):
    """Solution callback: the time and objective of every improving solution (shows what the hint gave and
    what CP-SAT added after it). Built here so that importing this module does not import OR-Tools."""
    from ortools.sat.python import cp_model

    class Recorder(cp_model.CpSolverSolutionCallback):
        def __init__(self) -> None:
            super().__init__()
            self.solutions: list[tuple[float, int]] = []

        def on_solution_callback(self) -> None:
            self.solutions.append((round(time.perf_counter() - t0, 3), round(self.ObjectiveValue())))

    return Recorder()
