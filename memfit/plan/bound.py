"""Whole-graph lower bound on non-compulsory traffic: a capacity argument per operator.

While op `o` runs, its working set ws(o) is resident. A tensor is *live across* o when it was written (or,
for an input/weight, first read) before o and is read again after o. Whatever is live across o and does not
fit next to ws(o) must be out of the scratchpad at o's step, which costs at least
  2 * bytes for an activation (stored after production, loaded again before its next read),
  1 * bytes for an input/weight (loaded again; its first load is compulsory) or a graph output (its one
  store is compulsory anyway).
One eviction may serve many ops, so the cheapest way to make every op fit is a small CP-SAT model:

  minimise  sum_v cost_v * z_v
  s.t.      ws(o) + sum_v bytes_v * (live[v,o] - out[v,o]) <= capacity      for every op o
            out[v,o] <= live[v,o],  out[v,o] <= z_v                          (z_v: v is evicted at least once)

Which tensors are live across o depends on the order only through "does op q run before o?". For q an
ancestor (descendant) of o that is fixed; for q unordered with o it is a Boolean before[q,o] (with
before[o,q] = not before[q,o], and chained along graph edges: before[q,o] implies before[pred(q),o] and
before[q,succ(o)]). live[v,o] >= before[producer,o] + after[consumer,o] - 1 for each consumer (pairs of
consumers for an input/weight). So the model ranges over a superset of all orders (the bound holds for every
order); with `order` given every before[] is a constant and it bounds that order only. The proven objective
bound of CP-SAT is the lower bound, valid even when the solve stops early. It ignores fragmentation and
repeated evictions of one tensor, so it can be below the optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from memfit.plan.clock import current
from memfit.plan.plan_format import Graph


@dataclass
class LowerBound:
    bytes: int  # proven lower bound on non-compulsory traffic
    scope: str  # "all orders" | "fixed order"
    status: str  # optimal (the bound model was solved) | bound (stopped early; still a valid bound)
    time_s: float
    tight_ops: list[str] = field(default_factory=list)  # ops where live bytes may exceed the scratchpad
    parts: dict = field(default_factory=dict)  # memfit.plan.planner: each bound method's bytes, when combined


def reachability(g: Graph) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Bitsets (Python ints over op indices): ancestors and descendants of every op, and each op's own bit."""
    bit = {o.name: 1 << i for i, o in enumerate(g.ops)}
    preds = {o.name: {g.tensor[n].producer for n in o.inputs if g.tensor[n].producer} for o in g.ops}
    anc: dict[str, int] = {}
    for o in g.ops:  # g.ops is topological
        a = 0
        for p in preds[o.name]:
            a |= anc[p] | bit[p]
        anc[o.name] = a
    succs: dict[str, set[str]] = {o.name: set() for o in g.ops}
    for o, ps in preds.items():
        for p in ps:
            succs[p].add(o)
    desc: dict[str, int] = {}
    for o in reversed(g.ops):
        d = 0
        for s in succs[o.name]:
            d |= desc[s] | bit[s]
        desc[o.name] = d
    return anc, desc, bit


def unordered_pairs(g: Graph) -> int:
    """Pairs of ops that neither precedes the other: the order-pair model's size (one Boolean each at most)."""
    anc, desc, _ = reachability(g)
    n = len(g.ops)
    return sum(n - 1 - bin(anc[o.name]).count("1") - bin(desc[o.name]).count("1") for o in g.ops) // 2


def eviction_cost(g: Graph, name: str) -> int:
    # A graph output's one store is compulsory wherever it happens, so evicting it early costs only the
    # reload; only a plain activation pays a spill store too.
    t = g.tensor[name]
    return 2 * t.bytes if t.kind == "activation" else t.bytes


class _Before:
    """before(q, o) as 1, 0 or a CP-SAT literal; one variable per unordered pair."""

    def __init__(self, g: Graph, m, order: list[str] | None) -> None:
        self.m, self.order = m, order
        self.step = {n: i for i, n in enumerate(order)} if order is not None else None
        if order is None:
            self.anc, self.desc, self.bit = reachability(g)
        self.var: dict[tuple[str, str], object] = {}

    def possibly(self, q: str, o: str) -> bool:
        """Can q run before o in some order?"""
        return self.get(q, o, create=False) != 0

    def get(self, q: str, o: str, create: bool = True):
        if q == o:
            return 0
        if self.step is not None:
            return int(self.step[q] < self.step[o])
        if self.anc[o] & self.bit[q]:
            return 1
        if self.desc[o] & self.bit[q]:
            return 0
        if not create:
            return None  # unordered: either way
        key = (q, o) if q < o else (o, q)
        if key not in self.var:
            self.var[key] = self.m.NewBoolVar(f"before[{key[0]},{key[1]}]")
        v = self.var[key]
        return v if key == (q, o) else v.Not()


def _candidates(g: Graph, bf: _Before, o: str) -> list[str]:
    """Tensors outside ws(o) that are live across o in some order."""
    ws = set(g.op[o].inputs) | set(g.op[o].outputs)
    out = []
    for t in g.tensors:
        if t.name in ws or not t.consumers:
            continue
        firsts = [t.producer] if t.producer is not None else t.consumers
        if any(bf.possibly(p, o) for p in firsts) and any(bf.possibly(o, c) for c in t.consumers):
            if t.producer is None and len(t.consumers) < 2:
                continue
            out.append(t.name)
    return out


def lower_bound(g: Graph, capacity: int, order: list[str] | None = None, time_limit_s: float = 5.0,
                num_workers: int = 2) -> LowerBound:
    """Proven lower bound on the non-compulsory traffic of any valid plan of `g` in `capacity` bytes
    (of any plan with this `order` when given)."""
    from ortools.sat.python import cp_model

    t0 = current().now()
    scope = "all orders" if order is None else "fixed order"
    m = cp_model.CpModel()
    bf = _Before(g, m, order)
    unit = math.gcd(*[t.bytes for t in g.tensors])
    rows = []
    for o in g.ops:
        cand = _candidates(g, bf, o.name)
        if g.working_set(o) + sum(g.tensor[n].bytes for n in cand) > capacity:
            rows.append((o.name, cand))
    if not rows:
        return LowerBound(0, scope, "optimal", current().now() - t0)
    z = {n: m.NewBoolVar(f"z[{n}]") for n in dict.fromkeys(n for _, c in rows for n in c)}
    for o, cand in rows:
        terms = []
        for n in cand:
            t = g.tensor[n]
            live = _live_literal(m, bf, t, o)
            if isinstance(live, int) and live == 0:
                continue
            out = m.NewBoolVar(f"out[{n},{o}]")
            m.AddImplication(out, z[n])
            if not isinstance(live, int):
                m.AddImplication(out, live)
            terms.append((t.bytes // unit) * (live - out))
        m.Add(g.working_set(g.op[o]) // unit + sum(terms) <= capacity // unit)
    _chain(g, bf)
    m.Minimize(sum((eviction_cost(g, n) // unit) * v for n, v in z.items()))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(num_workers)
    code = current().solve(solver, m, float(time_limit_s))
    if code == cp_model.INFEASIBLE:  # every op fits alone, so all-evicted is always feasible
        raise ValueError("lower bound model infeasible: an op's working set exceeds the scratchpad")
    # CP-SAT's best objective bound is proven even when the solve stops without a solution (UNKNOWN)
    bound = math.ceil(solver.BestObjectiveBound() - 1e-6) * unit
    status = "optimal" if code == cp_model.OPTIMAL else "bound"
    return LowerBound(max(0, bound), scope, status, current().now() - t0, [r[0] for r in rows])


def _live_literal(m, bf: _Before, t, o: str):
    """1, 0 or a Boolean that is forced to 1 whenever t is live across o."""
    firsts = [t.producer] if t.producer is not None else t.consumers
    pairs = []
    for p in firsts:
        b = bf.get(p, o)
        if isinstance(b, int) and b == 0:
            continue
        for c in t.consumers:
            if c == p:
                continue
            a = bf.get(o, c)
            if isinstance(a, int) and a == 0:
                continue
            if isinstance(b, int) and isinstance(a, int):
                return 1  # live in every order
            pairs.append((b, a))
    if not pairs:
        return 0
    live = m.NewBoolVar(f"live[{t.name},{o}]")
    for b, a in pairs:  # live >= before(p) + after(c) - 1
        m.AddBoolOr([x.Not() for x in (b, a) if not isinstance(x, int)] + [live])
    return live


def _chain(g: Graph, bf: _Before) -> None:
    """Consistency along edges for the unordered pairs in the model: q before o implies each predecessor of q
    is before o, and q is before each successor of o."""
    if bf.step is not None:
        return
    preds = {o.name: {g.tensor[n].producer for n in o.inputs if g.tensor[n].producer} for o in g.ops}
    succs: dict[str, set[str]] = {o.name: set() for o in g.ops}
    for o, ps in preds.items():
        for p in ps:
            succs[p].add(o)
    for (q, o), v in list(bf.var.items()):
        for qq, oo in ((q, o), (o, q)):  # v means q before o; v.Not() means o before q
            lit = bf.get(qq, oo)
            for p in preds[qq]:
                if (min(p, oo), max(p, oo)) in bf.var:
                    bf.m.AddImplication(lit, bf.get(p, oo))
            for s in succs[oo]:
                if (min(qq, s), max(qq, s)) in bf.var:
                    bf.m.AddImplication(lit, bf.get(qq, s))
