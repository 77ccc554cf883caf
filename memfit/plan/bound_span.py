"""An all-orders lower bound that charges each tensor's cost across the pieces it is live in (`span_bound`).

The split bound (memfit.plan.bound_split) charges a tensor to one piece only, and a piece's sub-network holds a
tensor only at the steps that use it. On the NAS cells at 1-2 MiB every 12-op piece then fits, and the bound is
0: the traffic comes from tensors that are live *across* pieces, written in one and read several pieces later.

Here the pieces are windows of `piece_ops` consecutive ops of a topological order. Window k's sub-network is its
ops, and these tensors get a share of their cost there:

  * a tensor the window's ops use at two steps or more: each gap between two of those uses that the piece's plan
    drops costs w[v,k] x the tensor's cost per drop (2 x bytes for an activation or output: store and reload;
    1 x bytes for an input or weight: a reload);
  * a tensor the window's ops do not use but that is live across some of them in every order (written, or for an
    input first read, by an ancestor of the op and read again by a descendant: memfit.plan.bound's
    reachability): one optional rectangle at one address from the first to the last of those ops, and
    w[v,k] x its cost per drop when the piece leaves it out (memfit.plan.whole's `through`);
  * with `some_orders`, also tensors live across the window only in some orders, with their writer and last
    readers as anchors (memfit.plan.bound_some).

Why the sum of the pieces' optima is a bound: restrict any valid plan of the whole graph to window k's ops, in
the order it runs them. What is resident at a step is a subset of what the plan holds then. A gap between two
uses of v in the window that the restriction drops holds one or more dropped gaps of the whole plan, and
distinct gaps of the window hold distinct ones, so the window counts at most drops(v), v's dropped gaps in the
whole plan. A tensor live across the window's ops that is not resident at one address from the first of them to
the last is out or moved in between, so v has at least two placements: one drop or more. So window k pays at most
w[v,k] x cost(v) x drops(v) for v, and with sum_k w[v,k] <= 1 the windows together pay at most what the plan
pays. The weights: 1 / (number of windows where v takes part), in integer units of 1/SCALE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from memfit.plan.analysis import memory_aware_order, subgraph
from memfit.plan.bound import reachability
from memfit.plan.bound_some import sometimes_live, with_anchors
from memfit.plan.bound_split import solve_pieces
from memfit.plan.clock import current
from memfit.plan.plan_format import Graph

SCALE = 2520  # weights are multiples of 1/SCALE (2520 = lcm(1..10): exact shares for up to 10 windows)


@dataclass
class SpanPiece:
    ops: list[str]  # the window, in topological order
    costed: dict[str, int]  # tensor used at 2+ steps of the window -> SCALE x w x cost per dropped gap
    through: dict[str, tuple[list[str], int, int]]  # tensor live across the window -> (ops, bytes, SCALE x w x cost)


@dataclass
class SpanBound:
    bytes: int
    status: str  # as SplitBound: optimal | partial | none | enough
    pieces: list[dict] = field(default_factory=list)
    time_s: float = 0.0
    skipped: int = 0


def drop_cost(g: Graph, name: str) -> int:
    """Bytes one dropped gap of the tensor costs (memfit.plan.validate): store + reload, or a reload."""
    t = g.tensor[name]
    return 2 * t.bytes if t.kind in ("activation", "output") else t.bytes


def live_across(g: Graph) -> dict[str, int]:
    """Tensor -> bitset of the ops it is live across in every order (outside their working sets)."""
    anc, desc, bit = reachability(g)
    out = {}
    for t in g.tensors:
        firsts = [t.producer] if t.producer is not None else list(t.consumers)
        if not t.consumers or (t.producer is None and len(t.consumers) < 2):
            continue
        after = 0
        for p in firsts:
            after |= desc[p]
        before = 0
        for c in t.consumers:
            before |= anc[c]
        users = sum(bit[o] for o in dict.fromkeys(firsts + list(t.consumers)))
        live = after & before & ~users
        if live:
            out[t.name] = live
    return out


def span_pieces(g: Graph, piece_ops: int, order: list[str] | None = None, some_orders: int = 0) -> list[SpanPiece]:
    """The windows of `order` (default: the graph's topological order) with each tensor's weighted costs.
    some_orders: also the (up to) this many largest tensors live across each window only in some orders, with
    their anchors (memfit.plan.bound_some)."""
    order = order or g.topo_order()
    reach = reachability(g)
    bit = reach[2]
    pos = {o: i for i, o in enumerate(order)}
    live = live_across(g)
    windows = [order[i:i + piece_ops] for i in range(0, len(order), piece_ops)]
    used, through = [], []
    for w in windows:
        count: dict[str, int] = {}
        for o in w:
            for n in dict.fromkeys(g.op[o].inputs + g.op[o].outputs):
                count[n] = count.get(n, 0) + 1
        used.append({n for n, c in count.items() if c >= 2})
        mask = sum(bit[o] for o in w)
        th = {n: [o for o in w if b & bit[o]] for n, b in live.items() if b & mask and n not in count}
        if some_orders:  # live only in some orders: its anchors (ops outside the window) stand in for the window's
            th.update(sometimes_live(g, w, set(count) | set(th), pos, reach, some_orders))
        through.append(th)
    share: dict[str, int] = {}
    for u, th in zip(used, through):
        for n in list(u) + list(th):
            share[n] = share.get(n, 0) + 1
    out = []
    for w, u, th in zip(windows, used, through):
        costed = {n: weight(share[n]) * drop_cost(g, n) for n in u}
        out.append(SpanPiece(w, costed, {n: (ops, g.tensor[n].bytes, weight(share[n]) * drop_cost(g, n))
                                         for n, ops in th.items()}))
    return out


def weight(windows: int) -> int:
    """A tensor's weight in each of the `windows` windows it takes part in, in units of 1/SCALE: the weights of
    one tensor must add up to at most SCALE for the sum to stay a bound."""
    return SCALE // windows


def span_bound(g: Graph, capacity: int, piece_ops: int = 12, time_limit_s: float = 30.0, num_workers: int = 2,
               enough_bytes: int | None = None, skip_fitting: bool = True, some_orders: int = 0) -> SpanBound:
    """Proven lower bound on the non-compulsory traffic of any plan of `g` in `capacity` bytes, any order: the
    windows' proven bounds (CP-SAT, order free inside each) added up and divided by SCALE. skip_fitting: leave
    out (count as 0, always valid) the windows whose tensors fit spill-free in a cheap order of the window.
    some_orders: charge also up to this many tensors per window that are live across it only in some orders
    (memfit.plan.bound_some; 0: off)."""
    t0 = current().now()
    ps = span_pieces(g, piece_ops, some_orders=some_orders)
    reach, pos = reachability(g), {o: i for i, o in enumerate(g.topo_order())}
    subs, precs = [], []
    for p in ps:
        sub = subgraph(g, p.ops)
        anchors = {o for ops, _, _ in p.through.values() for o in ops} - set(p.ops)
        sub, pr = with_anchors(g, sub, anchors, reach, pos) if anchors else (sub, [])
        subs.append(sub)
        precs.append(pr)
    keep = [i for i, (p, s) in enumerate(zip(ps, subs)) if (p.costed or p.through) and
            not (skip_fitting and _fits(s, p, capacity))]
    items = [(subs[i], subs[i].topo_order(), ps[i].costed, ps[i].through, precs[i]) for i in keep]
    enough = None if enough_bytes is None else enough_bytes * SCALE
    best, status = solve_pieces(items, capacity, time_limit_s, num_workers, enough, t0)
    total = sum(b["bound_bytes"] for b in best if b is not None)
    results = [b for b in best if b is not None]
    return SpanBound(math.ceil(total / SCALE), status, results, current().now() - t0, len(ps) - len(keep))


def _fits(sub: Graph, p: SpanPiece, capacity: int) -> bool:
    """The window's tensors and the tensors live across it fit spill-free (fragmentation aside) in the window's
    own or its memory-aware order: then its bound is almost always 0."""
    own = sub if len(sub.ops) == len(p.ops) else subgraph(sub, p.ops)  # without the anchors
    for order in (p.ops, memory_aware_order(own)):
        pos = {o: i for i, o in enumerate(order)}
        delta = [0] * (len(order) + 1)
        # a tensor live only in some orders (anchors outside the window): held across the whole window
        spans = [(min(pos[o] for o in ops), max(pos[o] for o in ops), b) if all(o in pos for o in ops) else
                 (0, len(order) - 1, b) for ops, b, _ in p.through.values()]
        for t in sub.tensors:
            steps = [pos[o] for o in ([t.producer] if t.producer else []) + list(t.consumers) if o in pos]
            if steps:
                spans.append((min(steps), max(steps), t.bytes))
        for a, b, size in spans:
            delta[a] += size
            delta[b + 1] -= size
        cur = peak = 0
        for d in delta[:-1]:
            cur += d
            peak = max(peak, cur)
        if peak <= capacity:
            return True
    return False
