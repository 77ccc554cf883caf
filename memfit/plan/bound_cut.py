"""A min-cut lower bound over all orders, for large branched graphs where the order-free CP-SAT bounds
(memfit.plan.bound, memfit.plan.bound_every) prove little in a few seconds.

When op o runs, the ops already run form a prefix P: it holds every ancestor of o and no descendant. Every
tensor written (an input: first read) inside P and read again outside P is live across o, and whatever of it
does not fit beside o's working set is out of the scratchpad at o's step. The order chooses P, so the bytes
live across o in *every* order are at least the minimum over such prefixes of the bytes crossing out of P: a
minimum closure, computed as one max-flow per op (OR-Tools' SimpleMaxFlow):

  source -> ancestors of o, o and its descendants -> sink, q -> pred(q) (P is closed under predecessors),
  per tensor v: first(v) -> y_v with capacity bytes_v, y_v -> each consumer (y_v in P only when all are),
  so the cut pays bytes_v exactly when v is written in P and read outside it.

excess(o) = ws(o) + cut(o) - capacity bytes must be evicted at o's step. An evicted byte costs at least one
byte of traffic (a reload), two when every tensor that could be live across o is a plain activation (store +
reload). Evictions of one tensor can serve several ops, so the bound sums excess costs only over ops whose
candidate sets (tensors live across o in *some* order) are pairwise disjoint, picked greedily, largest first.
"""
from __future__ import annotations

from memfit.plan.bound import LowerBound, reachability
from memfit.plan.clock import current
from memfit.plan.plan_format import Graph


def _candidates(g: Graph, anc: dict[str, int], desc: dict[str, int], bit: dict[str, int], o: str) -> set[str]:
    """A superset of the tensors that are live across o in some order (outside o's working set)."""
    ws = set(g.op[o].inputs) | set(g.op[o].outputs)
    out = set()
    later = desc[o] | bit[o]
    for t in g.tensors:
        if t.name in ws or not t.consumers or (t.producer is None and len(t.consumers) < 2):
            continue
        firsts = [t.producer] if t.producer is not None else t.consumers
        if any(not later & bit[p] for p in firsts) and any(not (anc[o] | bit[o]) & bit[c] for c in t.consumers):
            out.add(t.name)
    return out


def _min_crossing(g: Graph, o: str, cand: set[str], anc, desc, bit, idx: dict[str, int], preds) -> int:
    from ortools.graph.python import max_flow

    n = len(g.ops)
    src, snk, nxt = n, n + 1, n + 2
    inf = sum(g.tensor[v].bytes for v in cand) + 1
    f = max_flow.SimpleMaxFlow()
    for q in g.ops:
        for p in preds[q.name]:
            f.add_arc_with_capacity(idx[q.name], idx[p], inf)
        if anc[o] & bit[q.name]:
            f.add_arc_with_capacity(src, idx[q.name], inf)
        elif q.name == o or desc[o] & bit[q.name]:
            f.add_arc_with_capacity(idx[q.name], snk, inf)
    for v in cand:
        t = g.tensor[v]
        y, nxt = nxt, nxt + 1
        if t.producer is not None:
            first = idx[t.producer]
        else:  # an input/weight counts as written once any consumer has run
            first, nxt = nxt, nxt + 1
            for c in t.consumers:
                f.add_arc_with_capacity(idx[c], first, inf)
        f.add_arc_with_capacity(first, y, t.bytes)
        for c in t.consumers:
            f.add_arc_with_capacity(y, idx[c], inf)
    if f.solve(src, snk) != f.OPTIMAL:
        return 0
    return int(f.optimal_flow())


def cut_bound(g: Graph, capacity: int, time_limit_s: float = 5.0) -> LowerBound:
    """Proven lower bound on the non-compulsory traffic of any plan of `g` in `capacity` bytes, any order.
    Stops computing cuts at the time limit (the ops done so far still give a valid bound)."""
    t0 = current().now()
    anc, desc, bit = reachability(g)
    idx = {o.name: i for i, o in enumerate(g.ops)}
    preds = {o.name: {g.tensor[n].producer for n in o.inputs if g.tensor[n].producer} for o in g.ops}
    rows = []
    status = "optimal"
    for o in g.ops:
        cand = _candidates(g, anc, desc, bit, o.name)
        ws = g.working_set(o)
        if ws + sum(g.tensor[v].bytes for v in cand) <= capacity:
            continue
        if current().now() - t0 > time_limit_s:
            status = "bound"
            break
        excess = ws + _min_crossing(g, o.name, cand, anc, desc, bit, idx, preds) - capacity
        if excess > 0:
            factor = 2 if all(g.tensor[v].kind == "activation" for v in cand) else 1
            rows.append((factor * excess, o.name, cand))
    total, used, tight = 0, set(), []
    for cost, o, cand in sorted(rows, key=lambda r: -r[0]):
        if not cand & used:
            total += cost
            used |= cand
            tight.append(o)
    return LowerBound(total, "all orders", status, current().now() - t0, tight)
