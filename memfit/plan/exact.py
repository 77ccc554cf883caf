"""The joint COSMA-style model in OR-Tools CP-SAT: operator order, residency (spill/reload) and addresses.

Per tensor v and step t (only inside v's possible window):
  r[v,t]  resident              a[v,t]  offset in address units (fixed while resident)
  l[v,t]  loaded at t           d[v,t]  stored at t (an activation/output dropped while a later use remains)
Per op o: x[o,t] "o runs at step t" (a constant when the order is fixed).
Constraints: an op's inputs/outputs are resident at its step; an activation is resident only once produced;
resident tensors never share bytes at a step (one NoOverlap per step over optional intervals, plus the
capacity sum as a redundant cut); the offset is kept between consecutive resident steps.
Objective: bytes loaded + bytes stored (compulsory first loads included; reported without them).

`Segment` describes a window of a larger plan (used by the divide-and-conquer heuristic): tensors resident
at entry (`entry`, with offsets) and tensors still needed after the window (`beyond`, stored if dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from memfit.plan.clock import current
from memfit.plan.errors import BoundViolationError
from memfit.plan.plan_format import Graph, Placement


@dataclass
class ExactConfig:
    time_limit_s: float = 10.0
    num_workers: int = 2
    free_order: bool | None = None  # None: optimise the order when the graph has <= max_free_order_ops ops
    max_free_order_ops: int = 40
    seed: int = 0
    log: bool = False


@dataclass
class Segment:
    ops: list[str]  # in a valid (topological) base order
    free_order: bool = False
    entry: dict[str, int] = field(default_factory=dict)  # tensor -> byte offset, resident before step 0
    beyond: set[str] = field(default_factory=set)  # tensors used after the last step of this segment
    loaded_before: set[str] = field(default_factory=set)  # inputs/weights already loaded once earlier
    exit: dict[str, int] = field(default_factory=dict)  # tensor -> offset it must hold at the last step


@dataclass
class SegmentResult:
    order: list[str]
    placements: list[Placement]  # steps relative to the segment
    status: str  # optimal | feasible | none
    objective_bytes: int  # non-compulsory bytes by the model's count
    bound_bytes: int
    time_s: float
    exit: dict[str, int]  # tensors of `beyond` resident at the last step -> offset


def address_unit(g: Graph) -> int:
    """gcd of all tensor sizes: offsets in these units lose nothing and keep CP-SAT's domains small."""
    return math.gcd(*[t.bytes for t in g.tensors]) or 1


def _step_domains(g: Graph, ops: list[str], free: bool) -> dict[str, tuple[int, int]]:
    """[earliest, latest] step of each op within the segment (ASAP/ALAP over in-segment edges)."""
    if not free:
        return {o: (i, i) for i, o in enumerate(ops)}
    inside = set(ops)
    preds = {o: {g.tensor[n].producer for n in g.op[o].inputs} & inside for o in ops}
    succs: dict[str, set[str]] = {o: set() for o in ops}
    for o, ps in preds.items():
        for p in ps:
            succs[p].add(o)
    lo: dict[str, int] = {}
    for o in ops:  # ops is topological
        lo[o] = max((lo[p] + 1 for p in preds[o]), default=0)
    hi: dict[str, int] = {}
    for o in reversed(ops):
        hi[o] = min((hi[s] - 1 for s in succs[o]), default=len(ops) - 1)
    return {o: (lo[o], hi[o]) for o in ops}


def solve_segment(g: Graph, capacity: int, seg: Segment, cfg: ExactConfig,
                  hint: tuple[list[str], list[Placement]] | None = None, floor_bytes: int = 0) -> SegmentResult:
    """Solve one window (the whole graph when `seg` has no entry/beyond). floor_bytes: a proven lower bound
    on the non-compulsory bytes (memfit.plan.bound), added as a cut so CP-SAT can stop once it is met."""
    from ortools.sat.python import cp_model

    t0 = current().now()
    m = cp_model.CpModel()
    unit = address_unit(g)
    cap_u = capacity // unit
    T = len(seg.ops)
    dom = _step_domains(g, seg.ops, seg.free_order)
    inside = set(seg.ops)

    # x[o][t] and s[o]; python ints when the order is fixed
    x: dict[str, dict[int, object]] = {}
    s: dict[str, object] = {}
    for o in seg.ops:
        lo, hi = dom[o]
        if lo == hi:
            x[o], s[o] = {lo: 1}, lo
        else:
            x[o] = {t: m.NewBoolVar(f"x[{o},{t}]") for t in range(lo, hi + 1)}
            s[o] = m.NewIntVar(lo, hi, f"s[{o}]")
            m.AddExactlyOne(x[o].values())
            m.Add(s[o] == sum(t * v for t, v in x[o].items()))
    if seg.free_order:
        for t in range(T):
            lits = [x[o][t] for o in seg.ops if t in x[o]]
            fixed = [v for v in lits if isinstance(v, int)]
            free = [v for v in lits if not isinstance(v, int)]
            if fixed:  # an op pinned to step t: nobody else runs there
                for v in free:
                    m.Add(v == 0)
            elif free:
                m.AddExactlyOne(free)
        for o in seg.ops:
            for n in g.op[o].inputs:
                p = g.tensor[n].producer
                if p in inside and not (isinstance(s[p], int) and isinstance(s[o], int)):
                    m.Add(s[p] + 1 <= s[o])

    # tensor windows
    window: dict[str, tuple[int, int]] = {}
    for n in dict.fromkeys([n for o in seg.ops for n in g.op[o].inputs + g.op[o].outputs] + list(seg.entry)):
        t = g.tensor[n]
        cons = [c for c in t.consumers if c in inside]
        if t.producer in inside:
            w0 = dom[t.producer][0]
        elif n in seg.entry:
            w0 = 0
        else:
            w0 = min(dom[c][0] for c in cons)
        if n in seg.beyond:
            w1 = T - 1
        elif cons:
            w1 = max(dom[c][1] for c in cons)
        elif t.producer in inside:
            w1 = dom[t.producer][1]
        else:
            continue  # entry tensor with no further use: dropped for free
        window[n] = (w0, w1)

    r: dict[str, dict[int, object]] = {}
    a: dict[str, dict[int, object]] = {}
    cont: dict[str, object] = {}
    cost: list[tuple[int, object]] = []
    for n, (w0, w1) in window.items():
        t = g.tensor[n]
        su = t.bytes // unit
        r[n] = {k: m.NewBoolVar(f"r[{n},{k}]") for k in range(w0, w1 + 1)}
        a[n] = {k: m.NewIntVar(0, cap_u - su, f"a[{n},{k}]") for k in range(w0, w1 + 1)}
        for k in range(w0, w1 + 1):
            m.Add(a[n][k] == 0).OnlyEnforceIf(r[n][k].Not())  # symmetry: park unused offsets at 0
            if k < w1:
                m.Add(a[n][k] == a[n][k + 1]).OnlyEnforceIf([r[n][k], r[n][k + 1]])
        if n in seg.exit:  # pinned at the window's end (a window of a larger plan that continues from here)
            m.Add(r[n][w1] == 1)
            m.Add(a[n][w1] == seg.exit[n] // unit)
        if n in seg.entry:
            cont[n] = m.NewBoolVar(f"cont[{n}]")
            m.AddImplication(cont[n], r[n][0])
            m.Add(a[n][0] == seg.entry[n] // unit).OnlyEnforceIf(cont[n])
        prod_in = t.producer in inside
        if prod_in:  # resident only once produced
            p = t.producer
            for k in range(w0, w1 + 1):
                if not isinstance(s[p], int):
                    m.Add(s[p] <= k).OnlyEnforceIf(r[n][k])
        # loads: a 0 -> 1 transition not caused by production
        for k in range(w0, w1 + 1):
            prev = r[n][k - 1] if k > w0 else (cont[n] if n in cont and k == 0 else 0)
            created = x[t.producer].get(k, 0) if prod_in else 0
            if isinstance(created, int) and created == 1:
                continue
            lv = m.NewBoolVar(f"l[{n},{k}]")
            m.Add(lv >= r[n][k] - prev - created)
            cost.append((t.bytes, lv))
        if t.kind in ("activation", "output"):
            # stores: a 1 -> 0 transition while a later use remains
            cons = [c for c in t.consumers if c in inside]
            later_beyond = n in seg.beyond
            last_use = None
            if not later_beyond and any(not isinstance(s[c], int) for c in cons):
                last_use = m.NewIntVar(0, T - 1, f"last[{n}]")
                m.AddMaxEquality(last_use, [s[c] for c in cons])
            start = -1 if n in cont else w0
            for k in range(start, w1):
                if later_beyond:
                    f: object = 1
                elif last_use is None:
                    f = int(any(s[c] > k for c in cons))
                else:
                    f = m.NewBoolVar(f"f[{n},{k}]")
                    m.Add(last_use >= k + 1).OnlyEnforceIf(f)
                    m.Add(last_use <= k).OnlyEnforceIf(f.Not())
                if isinstance(f, int) and f == 0:
                    continue
                here = 1 if k == -1 else r[n][k]
                nxt = cont[n] if k == -1 else r[n][k + 1]
                dv = m.NewBoolVar(f"d[{n},{k}]")
                m.Add(dv >= here - nxt - (1 - f))
                cost.append((t.bytes, dv))
    for o in seg.ops:  # residency of each op's tensors at its step
        for n in dict.fromkeys(g.op[o].inputs + g.op[o].outputs):
            for k, xv in x[o].items():
                if isinstance(xv, int):
                    m.Add(r[n][k] == 1)
                else:
                    m.AddImplication(xv, r[n][k])
    for k in range(T):  # no two resident tensors share a byte; capacity
        ivs, terms = [], []
        for n in window:
            if k in r[n]:
                su = g.tensor[n].bytes // unit
                ivs.append(m.NewOptionalFixedSizeIntervalVar(a[n][k], su, r[n][k], f"iv[{n},{k}]"))
                terms.append(su * r[n][k])
        if len(ivs) > 1:
            m.AddNoOverlap(ivs)
            m.Add(sum(terms) <= cap_u)
    compulsory = sum(g.tensor[n].bytes for n in window
                     if g.tensor[n].kind in ("input", "weight") and n not in seg.entry and n not in seg.loaded_before)
    m.Minimize(sum(c * v for c, v in cost))
    m.Add(sum(c * v for c, v in cost) >= compulsory + max(0, floor_bytes))  # valid cut: lets CP-SAT stop early
    if hint is not None:
        _add_hint(m, g, seg, hint, x, r, a, cont, unit)

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(cfg.num_workers)
    solver.parameters.random_seed = int(cfg.seed)
    solver.parameters.log_search_progress = bool(cfg.log)
    code = current().solve(solver, m, float(cfg.time_limit_s))
    elapsed = current().now() - t0
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SegmentResult([], [], "none", -1, max(0, int(solver.BestObjectiveBound()) - compulsory), elapsed, {})
    order = sorted(seg.ops, key=lambda o: solver.Value(s[o]) if not isinstance(s[o], int) else s[o])
    placements: list[Placement] = []
    exit_state: dict[str, int] = {}
    for n, rs in r.items():
        run_start = None
        for k in sorted(rs) + [None]:
            on = k is not None and solver.BooleanValue(rs[k])
            if on and run_start is None:
                run_start = k
            if not on and run_start is not None:
                end = (k - 1) if k is not None else max(rs)
                placements.append(Placement(n, solver.Value(a[n][run_start]) * unit, run_start, end))
                run_start = None
        if n in seg.beyond and (T - 1) in rs and solver.BooleanValue(rs[T - 1]):
            exit_state[n] = solver.Value(a[n][T - 1]) * unit
    status = "optimal" if code == cp_model.OPTIMAL else "feasible"
    obj = round(solver.ObjectiveValue()) - compulsory
    bound = max(0, math.ceil(solver.BestObjectiveBound() - 1e-6) - compulsory)
    if bound > obj:  # CP-SAT's bound never exceeds its own objective; anything else is a modelling bug
        raise BoundViolationError("exact segment", bound, obj)
    return SegmentResult(order, placements, status, obj, bound, elapsed, exit_state)


def _add_hint(m, g: Graph, seg: Segment, hint, x, r, a, cont, unit: int) -> None:
    """Seed CP-SAT with a known plan (order + placements in segment steps)."""
    order, placements = hint
    pos = {o: i for i, o in enumerate(order)}
    for o, xs in x.items():
        for k, v in xs.items():
            if not isinstance(v, int):
                m.AddHint(v, int(pos[o] == k))
    on: dict[tuple[str, int], int] = {}
    for pl in placements:
        for k in range(pl.start, pl.end + 1):
            on[(pl.tensor, k)] = pl.offset // unit
    for n, rs in r.items():
        for k, v in rs.items():
            m.AddHint(v, int((n, k) in on))
            m.AddHint(a[n][k], on.get((n, k), 0))
    for n, v in cont.items():  # continues when the hint keeps it at its entry offset
        m.AddHint(v, int(on.get((n, 0)) == seg.entry[n] // unit))
