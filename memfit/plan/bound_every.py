"""A lower bound over all orders that stays informative and fast on large branched graphs.

`memfit.plan.bound.lower_bound` lets CP-SAT choose, per pair of unordered ops, which runs first. On 300-400-op
cells that model is too large to solve in a few seconds, and its proven bound then stays near 0. This bound
keeps only what *every* order shares: tensor v is live across op o in every order when v is first written
(or, for an input/weight, first read) by an ancestor of o and read again by a descendant of o. Whatever of
that does not fit beside o's working set must be out of the scratchpad at o's step, so

  minimise  sum_v cost_v * z_v                      (cost: 2 x bytes for an activation, else 1 x bytes)
  s.t.      sum_{v in L(o)} bytes_v * z_v >= ws(o) + bytes(L(o)) - capacity     for every op o

is a covering knapsack with no order variables. A finer count: the uses of v split its life into gaps, and
one eviction (store + reload, or a reload) empties one gap. Op o lies in gap j = (uses of v before o), which
is in [|consumers that are ancestors of o|, |consumers| - |consumers that are descendants of o|] in every
order. So z[v, j] says gap j of v is evicted, v is out at o only if some z[v, j] in o's range holds, and the
objective counts one eviction per evicted gap: ops in disjoint ranges cannot share one eviction.
"""
from __future__ import annotations

import math

from memfit.plan.bound import LowerBound, eviction_cost, reachability
from memfit.plan.clock import current
from memfit.plan.plan_format import Graph


def _gaps(g: Graph, anc: dict[str, int], desc: dict[str, int], bit: dict[str, int], o: str) -> dict[str, tuple[int, int]]:
    """Tensors live across o in every order -> the range of gap indices o can lie in."""
    ws = set(g.op[o].inputs) | set(g.op[o].outputs)
    out = {}
    for t in g.tensors:
        if t.name in ws or not t.consumers:
            continue
        firsts = [t.producer] if t.producer is not None else t.consumers
        if not any(anc[o] & bit[p] for p in firsts):
            continue
        after = sum(1 for c in t.consumers if desc[o] & bit[c])
        if after == 0:
            continue
        before = sum(1 for c in t.consumers if anc[o] & bit[c])
        out[t.name] = (before, len(t.consumers) - after)
    return out


def every_order_bound(g: Graph, capacity: int, time_limit_s: float = 5.0, num_workers: int = 2) -> LowerBound:
    """Proven lower bound on the non-compulsory traffic of any valid plan of `g`, in any order."""
    from ortools.sat.python import cp_model

    t0 = current().now()
    anc, desc, bit = reachability(g)
    unit = math.gcd(*[t.bytes for t in g.tensors])
    rows = []
    for o in g.ops:
        live = _gaps(g, anc, desc, bit, o.name)
        need = g.working_set(o) + sum(g.tensor[n].bytes for n in live) - capacity
        if need > 0:
            rows.append((o.name, live, need))
    if not rows:
        return LowerBound(0, "all orders", "optimal", current().now() - t0)
    m = cp_model.CpModel()
    z: dict[tuple[str, int], object] = {}
    for o, live, need in rows:
        terms = []
        for n, (lo, hi) in live.items():
            for j in range(lo, hi + 1):
                if (n, j) not in z:
                    z[(n, j)] = m.NewBoolVar(f"z[{n},{j}]")
            if lo == hi:
                out = z[(n, lo)]
            else:  # out at o only if one of the gaps o may lie in is evicted
                out = m.NewBoolVar(f"out[{n},{o}]")
                m.AddBoolOr([z[(n, j)] for j in range(lo, hi + 1)]).OnlyEnforceIf(out)
            terms.append((g.tensor[n].bytes // unit) * out)
        m.Add(sum(terms) >= -(-need // unit))
    m.Minimize(sum((eviction_cost(g, n) // unit) * v for (n, _), v in z.items()))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(num_workers)
    code = current().solve(solver, m, float(time_limit_s))
    if code == cp_model.INFEASIBLE:  # evicting everything always works when each op fits alone
        raise ValueError("every-order bound model infeasible: an op's working set exceeds the scratchpad")
    bound = max(0, math.ceil(solver.BestObjectiveBound() - 1e-6)) * unit
    status = "optimal" if code == cp_model.OPTIMAL else "bound"
    return LowerBound(bound, "all orders", status, current().now() - t0, [r[0] for r in rows])
