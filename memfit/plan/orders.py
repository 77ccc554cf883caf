"""Candidate operator orders for seeding the planners (memfit's own order search; the baselines keep the
framework and memory-aware orders a runtime would use).

On branched graphs (NAS cells, DenseNet blocks) the order decides most of the traffic: finishing one branch
before starting the next keeps fewer results live. `dfs_order` runs the graph depth-first from its outputs,
scheduling an op right after its inputs, visiting predecessors in a chosen priority (Sethi-Ullman style:
the costliest branch first, so its result is live while the cheaper ones run, not the other way round).
"""
from __future__ import annotations

from collections.abc import Callable

from memfit.plan.analysis import memory_aware_order
from memfit.plan.plan_format import Graph


def _preds(g: Graph) -> dict[str, list[str]]:
    return {o.name: list(dict.fromkeys(g.tensor[n].producer for n in o.inputs if g.tensor[n].producer))
            for o in g.ops}


def dfs_order(g: Graph, priority: Callable[[str], tuple]) -> list[str]:
    """Post-order DFS from the sinks (in framework order); predecessors of each op visited by `priority`
    (smallest first). Iterative: graphs have thousands of ops."""
    preds = _preds(g)
    has_succ = {p for ps in preds.values() for p in ps}
    done: set[str] = set()
    order: list[str] = []
    for sink in [o.name for o in g.ops if o.name not in has_succ]:
        stack = [(sink, iter(sorted(preds[sink], key=priority)))]
        while stack:
            name, it = stack[-1]
            nxt = next((p for p in it if p not in done), None)
            if nxt is None:
                stack.pop()
                if name not in done:
                    done.add(name)
                    order.append(name)
            elif all(s[0] != nxt for s in stack):
                stack.append((nxt, iter(sorted(preds[nxt], key=priority))))
    return order


def ancestors_bytes(g: Graph) -> dict[str, int]:
    """Bytes written by each op and all its ancestors (a branch's cost, counted with overlaps)."""
    preds = _preds(g)
    own = {o.name: sum(g.tensor[n].bytes for n in o.outputs) for o in g.ops}
    anc: dict[str, set[str]] = {}
    for o in g.ops:  # topological
        s: set[str] = set()
        for p in preds[o.name]:
            s |= anc[p]
            s.add(p)
        anc[o.name] = s
    return {o: own[o] + sum(own[a] for a in anc[o]) for o in own}


def candidate_orders(g: Graph) -> dict[str, list[str]]:
    """Framework, memory-aware and depth-first orders (heaviest branch first, and lightest first)."""
    index = {o.name: i for i, o in enumerate(g.ops)}
    cost = ancestors_bytes(g)
    orders = {"topo": g.topo_order(), "memory": memory_aware_order(g),
              "dfs-heavy-first": dfs_order(g, lambda p: (-cost[p], index[p])),
              "dfs-light-first": dfs_order(g, lambda p: (cost[p], index[p]))}
    unique: dict[str, list[str]] = {}
    for name, order in orders.items():
        if order not in unique.values():
            unique[name] = order
    return unique


def order_seeds(g: Graph, capacity: int) -> list:
    """Plans on the depth-first candidate orders (two-phase arena and online Belady on each): seeds the
    planners try beside the baselines. Each plan's details name its order."""
    from memfit.plan.baselines import arena_placements
    from memfit.plan.belady import online_belady
    from memfit.plan.plan_format import Plan, SolverInfo

    plans = []
    for name, order in candidate_orders(g).items():
        if name in ("topo", "memory"):  # the baselines' own orders: already among the baselines
            continue
        for kind, (placements, details) in (("arena", arena_placements(g, order, capacity)),
                                            ("belady", online_belady(g, order, capacity))):
            plans.append(Plan(g, capacity, order, placements, f"seed-{name}-{kind}",
                              SolverInfo("seed", 0.0, details={**details, "order": name})))
    return plans
