"""Tensors live across a window only in *some* orders, for the span bound (memfit.plan.bound_span).

The span bound charges a tensor the window does not use only where it is live across the window's ops in every
order (written by an ancestor, read again by a descendant). On the NAS cells at 1-2 MiB most of the traffic comes
from tensors that are live across a window only in the orders that run their writer before it and a reader after
it (their writer or readers lie in parallel branches), and the span bound proves 0 there (DARTS 1 MiB, NASNet-A
2 MiB).

Such a tensor v enters the window's sub-network with its *anchors*: its writer p and its readers that no other
reader follows in every order (the last reader is one of them). The anchors join the window's ops as ops with no
tensors of their own, ordered by the graph's precedences among all of those ops (`precedes`), and v gets one
optional rectangle from p's step to its last anchor's step at one address (memfit.plan.whole's `through`), which
costs w[v,k] x its cost per drop when left out.

Why the bound stays valid: restrict a plan of the whole graph to the window's ops and the anchors, in the order it
runs them. Every precedence added holds in that order (it holds in the graph). An anchor's own tensors are left
out, which only frees space. If the plan keeps v resident at one address from p to its last reader, v is resident
at every step in between, beside whatever else the restriction holds there, so the rectangle fits; otherwise v has
two placements or more, so the plan drops v at least once and pays its cost per drop at least once. The weights
of each tensor still add up to at most 1 over every window it takes part in (bound_span.weight), so the windows
together charge no more than the plan pays.

Which windows a tensor takes part in is free (leaving it out of a window only lowers that window's bound); here it
is the windows that its lifetime overlaps in the reference topological order, its `limit` largest per window, so
its weight is not spread over every window that runs in parallel with it.
"""
from __future__ import annotations

from memfit.plan.plan_format import Graph, OpSpec, build_graph


def sometimes_live(g: Graph, window: list[str], skip: set[str], pos: dict[str, int], reach: tuple,
                   limit: int) -> dict[str, list[str]]:
    """Tensor -> its anchors (writer first, then the readers not followed by another reader in every order), for
    the `limit` largest tensors outside `skip` (those the window uses or holds in every order) that are live across
    some op of `window` in some order and whose lifetime overlaps the window in the order `pos`."""
    anc, desc, bit = reach
    lo, hi = pos[window[0]], pos[window[-1]]
    found = []
    for t in g.tensors:
        p = t.producer
        if p is None or not t.consumers or t.name in skip or pos[p] >= hi or max(pos[c] for c in t.consumers) <= lo:
            continue
        # live at o in some order: p can run before o (p is no descendant of o) and a reader after it (no ancestor)
        if not any(not desc[o] & bit[p] and any(not anc[o] & bit[c] for c in t.consumers) for o in window):
            continue
        last = [c for c in t.consumers if not any(desc[c] & bit[d] for d in t.consumers)]
        found.append((t.bytes, t.name, [p, *last]))
    found.sort(key=lambda x: (-x[0], x[1]))
    return {n: ops for _, n, ops in found[:limit]}


def with_anchors(g: Graph, sub: Graph, anchors: set[str], reach: tuple,
                 pos: dict[str, int]) -> tuple[Graph, list[tuple[str, str]]]:
    """The window's sub-network `sub` with the anchor ops added (no tensors), ops in the order `pos`, and every
    precedence of the graph between an anchor and another op of the result (a runs before b)."""
    anc, _, bit = reach
    extra = sorted(anchors - set(sub.op), key=pos.__getitem__)
    ops = sorted([*sub.ops, *[OpSpec(a, [], [], g.op[a].type) for a in extra]], key=lambda o: pos[o.name])
    names = [o.name for o in ops]
    precedes = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                if (a in anchors or b in anchors) and anc[b] & bit[a]]
    return build_graph(sub.model + "+anchors", list(sub.tensors), ops), precedes
