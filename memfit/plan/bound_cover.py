"""One covering model over the min-cut and every-order rows: the all-orders bound for large branched graphs.

`bound_cut` proves, per op o, that at least excess(o) = ws(o) + mincut(o) - capacity bytes are out of the
scratchpad at o's step in *every* order, but it can only add up ops whose candidate tensors are disjoint (one
eviction may serve many ops), so on cells it sums a handful of ops. `bound_every` shares evictions properly
(one Boolean per gap between a tensor's uses) but only over the tensors live across o in every order, which
on cells is almost nothing. This model puts both kinds of rows into one covering problem:

  z[v, j]       gap j of tensor v (between its j-th and j+1-th use; gap 0 starts at its producer) is evicted
  out[v, o]     v is out of the scratchpad while o runs:  out[v, o] -> OR_{j in range(v, o)} z[v, j]
  cut row  o:   sum_{v in cand(o)} bytes_v * out[v, o] >= excess(o)     cand(o): live across o in *some* order
  cover row o:  sum_{v in live(o)} bytes_v * out[v, o] >= ws(o) + bytes(live(o)) - capacity
                                                                         live(o): live across o in *every* order
  minimise      sum cost_v * z[v, j]        (cost: 2 x bytes for an activation, store + reload; else 1 x bytes)

range(v, o) is the gap o can lie in over all orders: from |consumers of v that are ancestors of o| to
|consumers| - |consumers that are descendants of o|. Every valid plan gives a solution (out = "not resident
at o's step", z = "this gap was dropped", each dropped gap paying its store and reload), so CP-SAT's proven
objective bound is a lower bound on non-compulsory traffic over all orders, valid even when it stops early;
so is the Lagrangian value of the LP relaxation's duals (cover_lp_bound), which is what large graphs get.
It ignores fragmentation and lets each op choose its own worst-case prefix, so it can be below the optimum.
"""
from __future__ import annotations

import math

from memfit.plan.bound import LowerBound, eviction_cost, reachability
from memfit.plan.bound_cut import _candidates, _min_crossing
from memfit.plan.bound_every import _gaps
from memfit.plan.clock import current
from memfit.plan.plan_format import Graph


def _gap_range(g: Graph, anc: dict[str, int], desc: dict[str, int], bit: dict[str, int], v: str, o: str) -> tuple[int, int]:
    cons = g.tensor[v].consumers
    before = sum(1 for c in cons if anc[o] & bit[c])
    after = sum(1 for c in cons if desc[o] & bit[c])
    lo, hi = before, len(cons) - after
    if g.tensor[v].producer is None:  # an input/weight is live only between two reads: gaps 1 .. reads-1
        lo, hi = max(lo, 1), min(hi, len(cons) - 1)
    return lo, hi


def cover_rows(g: Graph, capacity: int, time_limit_s: float = 5.0) -> tuple[list[tuple[str, dict, int]], bool]:
    """The model's rows: (op, {tensor: gap range}, bytes that must be out). False when the min cuts ran out
    of time (the rows found still give a valid bound)."""
    t0 = current().now()
    anc, desc, bit = reachability(g)
    idx = {o.name: i for i, o in enumerate(g.ops)}
    preds = {o.name: {g.tensor[n].producer for n in o.inputs if g.tensor[n].producer} for o in g.ops}
    rows, complete = [], True
    for o in g.ops:
        ws = g.working_set(o)
        live = _gaps(g, anc, desc, bit, o.name)
        need = ws + sum(g.tensor[n].bytes for n in live) - capacity
        if need > 0:
            rows.append((o.name, live, need))
        cand = _candidates(g, anc, desc, bit, o.name)
        if ws + sum(g.tensor[v].bytes for v in cand) <= capacity:
            continue
        if current().now() - t0 > time_limit_s:
            complete = False
            continue
        excess = ws + _min_crossing(g, o.name, cand, anc, desc, bit, idx, preds) - capacity
        if excess > need:  # the cut row implies the cover row's need only when it is larger
            rng = {v: _gap_range(g, anc, desc, bit, v, o.name) for v in cand}
            rows.append((o.name, {v: r for v, r in rng.items() if r[0] <= r[1]}, excess))
    return rows, complete


CPSAT_MAX_OUTS = 40_000  # above this many out-variables (NASNet: 150k) CP-SAT finds no bound in seconds: LP only


def cover_bound(g: Graph, capacity: int, time_limit_s: float = 5.0, num_workers: int = 2) -> LowerBound:
    """Proven lower bound on the non-compulsory traffic of any valid plan of `g`, in any order: the larger of
    the model's LP bound (cover_lp_bound) and CP-SAT's proven objective bound (models up to CPSAT_MAX_OUTS)."""
    t0 = current().now()
    rows, complete = cover_rows(g, capacity, 0.6 * time_limit_s)
    if not rows:
        return LowerBound(0, "all orders", "optimal" if complete else "bound", current().now() - t0)
    outs = sum(len(r[1]) for r in rows)
    left = time_limit_s - (current().now() - t0)
    lp = cover_lp_bound(g, capacity, max(0.5, left / 2 if outs <= CPSAT_MAX_OUTS else left), rows=rows)
    best, proven = lp.bytes, False
    left = time_limit_s - (current().now() - t0)
    if outs <= CPSAT_MAX_OUTS and left > 0.2:
        cp, proven = _cover_cpsat(g, capacity, rows, left, num_workers)
        best = max(best, cp)
    status = "optimal" if proven and complete else "bound"
    return LowerBound(best, "all orders", status, current().now() - t0, [r[0] for r in rows])


def _cover_cpsat(g: Graph, capacity: int, rows: list[tuple[str, dict, int]], time_limit_s: float,
                 num_workers: int) -> tuple[int, bool]:
    """CP-SAT on the covering model: (its proven objective bound in bytes, whether it solved the model)."""
    from ortools.sat.python import cp_model

    unit = math.gcd(*[t.bytes for t in g.tensors])
    m = cp_model.CpModel()
    z: dict[tuple[str, int], object] = {}
    out: dict[tuple[str, str, int, int], object] = {}
    for o, rng, need in rows:
        terms = []
        for v, (lo, hi) in rng.items():
            for j in range(lo, hi + 1):
                if (v, j) not in z:
                    z[(v, j)] = m.NewBoolVar(f"z[{v},{j}]")
            if lo == hi:
                lit = z[(v, lo)]
            elif (v, o, lo, hi) in out:
                lit = out[(v, o, lo, hi)]
            else:  # out at o only if one of the gaps o may lie in is dropped
                lit = out[(v, o, lo, hi)] = m.NewBoolVar(f"out[{v},{o}]")
                m.AddBoolOr([z[(v, j)] for j in range(lo, hi + 1)]).OnlyEnforceIf(lit)
            terms.append((g.tensor[v].bytes // unit) * lit)
        m.Add(sum(terms) >= -(-need // unit))
    m.Minimize(sum((eviction_cost(g, v) // unit) * x for (v, _), x in z.items()))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(num_workers)
    code = current().solve(solver, m, float(time_limit_s))
    if code == cp_model.INFEASIBLE:  # dropping every gap always works when each op fits alone
        raise ValueError("cover bound model infeasible: an op's working set exceeds the scratchpad")
    return max(0, math.ceil(solver.BestObjectiveBound() - 1e-6)) * unit, code == cp_model.OPTIMAL


def cover_lp_bound(g: Graph, capacity: int, time_limit_s: float = 5.0,
                   rows: list[tuple[str, dict, int]] | None = None) -> LowerBound:
    """The same covering model's linear relaxation (GLOP), for graphs where CP-SAT finds no bound in time
    (NASNet: 1300 rows, 150k out-variables). The bound is not GLOP's objective but the Lagrangian value of its
    duals, clamped to >= 0 and evaluated here: for any duals y (rows), mu (links out <= sum z) >= 0 and
    variables in [0, 1],
      sum_r need_r y_r + sum_(v,r) min(0, mu_vr - bytes_v y_r) + sum_(v,j) min(0, cost_v - sum_(r: j in range) mu_vr)
    is at most the optimum of the model, so a solver that stops early or rounds still gives a valid bound."""
    from ortools.linear_solver import pywraplp

    t0 = current().now()
    complete = True
    if rows is None:
        rows, complete = cover_rows(g, capacity, time_limit_s / 2)
    if not rows:
        return LowerBound(0, "all orders", "optimal" if complete else "bound", current().now() - t0)
    unit = math.gcd(*[t.bytes for t in g.tensors])
    s = pywraplp.Solver.CreateSolver("GLOP")
    s.SetTimeLimit(int(1000 * max(0.5, time_limit_s - (current().now() - t0))))
    z: dict[tuple[str, int], object] = {}
    links = []  # (row index, tensor, (lo, hi), out variable, link constraint)
    row_cons = []
    for r, (o, rng, need) in enumerate(rows):
        row = s.Constraint(float(-(-need // unit)), s.infinity())
        row_cons.append(row)
        for v, (lo, hi) in rng.items():
            out = s.NumVar(0.0, 1.0, "")
            row.SetCoefficient(out, float(g.tensor[v].bytes // unit))
            link = s.Constraint(0.0, s.infinity())  # sum_j z[v, j] - out >= 0
            link.SetCoefficient(out, -1.0)
            for j in range(lo, hi + 1):
                if (v, j) not in z:
                    z[(v, j)] = s.NumVar(0.0, 1.0, "")
                link.SetCoefficient(z[(v, j)], 1.0)
            links.append((r, v, (lo, hi), link))
    obj = s.Objective()
    for (v, _), x in z.items():
        obj.SetCoefficient(x, float(eviction_cost(g, v) // unit))
    obj.SetMinimization()
    code = s.Solve()
    if code not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return LowerBound(0, "all orders", "bound", current().now() - t0)
    y = [max(0.0, c.dual_value()) for c in row_cons]
    value = sum(-(-rows[r][2] // unit) * y[r] for r in range(len(rows)))
    mu_sum: dict[tuple[str, int], float] = {}
    for r, v, (lo, hi), link in links:
        mu = max(0.0, link.dual_value())
        value += min(0.0, mu - (g.tensor[v].bytes // unit) * y[r])
        for j in range(lo, hi + 1):
            mu_sum[(v, j)] = mu_sum.get((v, j), 0.0) + mu
    for (v, j), m in mu_sum.items():
        value += min(0.0, eviction_cost(g, v) // unit - m)
    bound = max(0, math.ceil(value * (1 - 1e-9) - 1e-6)) * unit  # float sums: shave a hair before rounding up
    status = "optimal" if code == pywraplp.Solver.OPTIMAL and complete else "bound"
    return LowerBound(bound, "all orders", status, current().now() - t0, [r[0] for r in rows])
