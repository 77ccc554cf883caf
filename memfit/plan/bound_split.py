"""An all-orders lower bound that adds up over pieces of the graph (`split_bound`).

The tensors are split into groups: each tensor belongs to the piece of a topological order that writes it (a
graph input: to the piece of its first reader). A group's sub-network is the ops that use its tensors (their
writer and every reader), with every other tensor those ops touch still taking its space at its uses but moving
for free (`solve_whole(..., costed=group)`). Restricting any valid plan of the whole graph to those ops, in the
order it runs them, is a valid plan of the sub-network: what is resident at a step is a subset of what the
whole plan holds then, and every gap between two uses of a group tensor is the same gap as in the whole graph,
so a group tensor kept across it there is kept here. So the sub-network's optimum over all its orders is at
most what the whole plan pays for the group's tensors, and as the groups split the tensors, the sum of those
optima (or of CP-SAT's proven bounds on them) is at most the whole plan's non-compulsory traffic, in any order.

Each piece is solved by the whole-graph model with the order free (memfit.plan.whole), and only CP-SAT's proven
objective bound is used, so a piece that runs out of time still contributes what it proved; pieces not proven
in a first pass get the time the others left. Unlike the row
bounds (memfit.plan.bound_cut, bound_every), a piece's bound accounts for the order within the piece and for
fragmentation, which is what the cell networks' plans pay for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memfit.plan.analysis import memory_aware_order, peak_live_bytes, subgraph
from memfit.plan.clock import current
from memfit.plan.plan_format import Graph


@dataclass
class SplitBound:
    bytes: int
    status: str  # "optimal": every piece proven; "partial": some pieces only bounded; "none": no time;
    # "enough": stopped once the sum reached enough_bytes
    pieces: list[dict] = field(default_factory=list)  # per piece: ops, tensors, bound, status, seconds
    time_s: float = 0.0
    skipped: int = 0  # pieces left out by skip_fitting (each counted as 0; "optimal" is about the others)


def pieces(g: Graph, piece_ops: int) -> list[tuple[list[str], set[str]]]:
    """(ops of the sub-network, tensors it is charged for) per piece of `piece_ops` consecutive ops of the
    graph's topological order."""
    order = g.topo_order()
    pos = {o: i for i, o in enumerate(order)}
    owner: dict[str, int] = {}
    for t in g.tensors:
        at = t.producer if t.producer is not None else min(t.consumers, key=pos.__getitem__, default=None)
        if at is not None:
            owner[t.name] = pos[at] // piece_ops
    out = []
    for k in range(0, (len(order) + piece_ops - 1) // piece_ops):
        group = {n for n, i in owner.items() if i == k}
        ops = {o for n in group for o in ([g.tensor[n].producer] if g.tensor[n].producer else [])
               + list(g.tensor[n].consumers)}
        if group and ops:
            out.append((sorted(ops, key=pos.__getitem__), group))
    return out


def split_bound(g: Graph, capacity: int, piece_ops: int = 24, time_limit_s: float = 30.0,
                num_workers: int = 2, enough_bytes: int | None = None, skip_fitting: bool = False) -> SplitBound:
    """Sum over the pieces of CP-SAT's proven all-orders bound on each piece's charged traffic (see the
    module docstring for why the sum is valid) within about time_limit_s seconds. enough_bytes: stop as soon
    as the sum reaches it (a plan moving that much is then proven optimal; status "enough"). skip_fitting: leave
    out (count as 0, always valid) the pieces whose sub-network fits spill-free in its framework or memory-aware
    order, whose bound is then almost always 0: their time goes to the others (NASNet at 2-4 MiB: ~100 such
    pieces, ~27 s)."""
    t0 = current().now()
    ps = pieces(g, piece_ops)
    subs = [subgraph(g, ops) for ops, _ in ps]
    skipped = 0
    if skip_fitting:
        keep = [i for i, sub in enumerate(subs) if not _fits(sub, capacity)]
        skipped = len(ps) - len(keep)
        ps, subs = [ps[i] for i in keep], [subs[i] for i in keep]
    results, status = solve_pieces([(sub, ops, group, None, []) for sub, (ops, group) in zip(subs, ps)], capacity,
                                   time_limit_s, num_workers, enough_bytes, t0)
    return SplitBound(_total(results), status, [b for b in results if b is not None], current().now() - t0, skipped)


def solve_pieces(items: list[tuple[Graph, list[str], object, dict | None, list]], capacity: int, time_limit_s: float,
                 num_workers: int, enough_bytes: int | None, t0: float) -> tuple[list[dict | None], str]:
    """CP-SAT's proven all-orders bound on each (sub-network, its ops, costed, through, precedes) of `items`
    (memfit.plan.whole.solve_whole's arguments), in two passes: every piece gets its share of half the time, then
    the pieces not proven share what is left, those the first pass had no time left for included (a piece's bound
    is CP-SAT's proven one, so the larger of its two runs is still valid). Per piece a dict or None (no time),
    and the status: optimal | partial | none | enough (stopped once the sum reached enough_bytes)."""
    from memfit.plan.whole import WholeConfig, solve_whole

    best: list[dict | None] = [None] * len(items)
    for share, todo in ((0.5, range(len(items))), (1.0, None)):
        todo = list(todo) if todo is not None else \
            [i for i, b in enumerate(best) if b is None or b["status"] != "optimal"]
        stop = t0 + share * time_limit_s
        for j, i in enumerate(todo):
            left = current().left(stop)
            if left <= 0.05:
                break
            sub, ops, costed, through, precedes = items[i]
            kw = {"through": through, "precedes": precedes} if through else {}
            res = solve_whole(sub, capacity, ops, WholeConfig(left / (len(todo) - j), num_workers,
                                                              order_window=None), costed=costed, **kw)
            if res.status == "infeasible":  # a restriction of any valid plan fits: this is a modelling bug
                raise RuntimeError(f"split bound: piece {i} ({len(ops)} ops) has no plan in {capacity} bytes")
            prev = best[i] or {"bound_bytes": 0, "time_s": 0.0}
            best[i] = {"ops": len(ops), "tensors": len(costed), "bound_bytes": max(res.bound_bytes, prev["bound_bytes"]),
                       "plan_bytes": res.objective_bytes, "status": res.status,
                       "time_s": round(res.time_s + prev["time_s"], 2)}
            if enough_bytes is not None and _total(best) >= enough_bytes:  # any partial sum is already a bound
                return best, "enough"
    results = [b for b in best if b is not None]
    proven = len(results) == len(items) and all(b["status"] == "optimal" for b in results)
    return best, "optimal" if proven else ("partial" if results else "none")


def _fits(sub: Graph, capacity: int) -> bool:
    """The sub-network's live bytes fit in one of two cheap orders (no spill needed, fragmentation aside)."""
    return any(peak_live_bytes(sub, o) <= capacity for o in (sub.topo_order(), memory_aware_order(sub)))


def _total(best: list[dict | None]) -> int:
    return sum(b["bound_bytes"] for b in best if b is not None)
