"""Offline arena packing of residency intervals (the address half of the two-phase baselines).

Two interval orders, both from TFLite's offline arena planner:
  size     biggest interval first (GreedyBySize);
  breadth  steps by descending breadth (live bytes), each step's unplaced intervals biggest first
           (GreedyByBreadth).
Each interval goes to the smallest address gap free for its whole life (best fit), else on top.

When an interval does not fit, the fallback stays local: the step where that interval met the most live
bytes is made a *split step*. At a split step every interval crossing it is cut, so only the op's own
working set is resident there, each tensor for that one step (a store/reload around it). The working set
always fits (check_feasible), so repeating this converges; in the worst case every step is split, which is
the old whole-graph per-step fallback. The caller learns how many steps were split.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from memfit.plan.plan_format import Graph, Placement

Interval = tuple[str, int, int]  # (tensor, first step, last step), steps inclusive
PACKINGS = ("size", "breadth")


@dataclass
class Packed:
    placements: list[Placement]
    split_steps: list[int]  # steps where the local fallback evicted all but the op's working set
    packing: str


def _interval_order(g: Graph, intervals: list[Interval], packing: str) -> list[Interval]:
    by_size = sorted(intervals, key=lambda x: (-g.tensor[x[0]].bytes, x[1], x[0]))
    if packing == "size":
        return by_size
    if packing != "breadth":
        raise ValueError(f"unknown packing {packing!r}; choose one of {PACKINGS}")
    steps = 1 + max((e for _, _, e in intervals), default=-1)
    breadth = [0] * (steps + 1)
    for n, s, e in intervals:
        breadth[s] += g.tensor[n].bytes
        breadth[e + 1] -= g.tensor[n].bytes
    for t in range(1, steps):
        breadth[t] += breadth[t - 1]
    live: list[list[Interval]] = [[] for _ in range(steps)]
    for iv in by_size:  # per step, biggest first
        for t in range(iv[1], iv[2] + 1):
            live[t].append(iv)
    seen: set[Interval] = set()
    out: list[Interval] = []
    for t in sorted(range(steps), key=lambda t: (-breadth[t], t)):
        for iv in live[t]:
            if iv not in seen:
                seen.add(iv)
                out.append(iv)
    return out


def pack(g: Graph, intervals: list[Interval], capacity: int, packing: str = "size") -> tuple[list[Placement], list[Interval]]:
    """Best-fit addresses in the given packing order; returns (placements, intervals that did not fit)."""
    placed: list[tuple[int, int, int, int]] = []  # (start, end, offset, offset_end)
    result: list[Placement] = []
    failed: list[Interval] = []
    for n, s, e in _interval_order(g, intervals, packing):
        size = g.tensor[n].bytes
        busy = sorted((a, b) for (ps, pe, a, b) in placed if ps <= e and s <= pe)
        best, best_gap, top = None, 1 << 62, 0
        for a, b in busy:
            if a - top >= size and a - top < best_gap:
                best, best_gap = top, a - top
            top = max(top, b)
        if best is None:
            best = top
        if best + size > capacity:
            failed.append((n, s, e))
            continue
        placed.append((s, e, best, best + size))
        result.append(Placement(n, best, s, e))
    return result, failed


def use_lists(g: Graph, order: list[str]) -> dict[str, list[int]]:
    """Sorted steps at which each tensor is read or written by the ops of `order` (a sub-sequence is fine)."""
    uses: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        o = g.op[name]
        for n in dict.fromkeys(o.inputs + o.outputs):
            uses.setdefault(n, []).append(i)
    return uses


def split_at(intervals: list[Interval], uses: dict[str, list[int]], split: list[int]) -> list[Interval]:
    """Cut every interval at the (sorted) split steps and trim each piece to the uses inside it; a tensor used
    at a split step keeps a one-step piece there."""
    if not split:
        return intervals
    out: list[Interval] = []
    for n, s, e in intervals:
        u = uses[n]
        lo, hi = bisect.bisect_left(split, s), bisect.bisect_right(split, e)
        cuts = split[lo:hi]
        if not cuts:
            out.append((n, s, e))
            continue
        bounds = [s - 1, *cuts, e + 1]
        for a, b in zip(bounds, bounds[1:]):  # open pieces (a, b): strictly between two cuts
            i, j = bisect.bisect_left(u, a + 1), bisect.bisect_right(u, b - 1) - 1
            if i <= j:
                out.append((n, u[i], u[j]))
        for c in cuts:
            k = bisect.bisect_left(u, c)
            if k < len(u) and u[k] == c:
                out.append((n, c, c))
    return out


def _worst_step(g: Graph, intervals: list[Interval], iv: Interval) -> int:
    """The step of `iv`'s life where the most bytes are live (where a cut helps it most)."""
    _, s, e = iv
    live = [0] * (e - s + 1)
    for n, a, b in intervals:
        for t in range(max(a, s), min(b, e) + 1):
            live[t - s] += g.tensor[n].bytes
    return s + max(range(len(live)), key=lambda k: (live[k], -k))


def pack_local_fallback(g: Graph, order: list[str], intervals: list[Interval], capacity: int,
                        packing: str = "size") -> Packed:
    """`pack`, splitting the steps where intervals fail until everything fits (see the module docstring)."""
    uses = use_lists(g, order)
    split: set[int] = set()
    while True:
        cut = split_at(intervals, uses, sorted(split))
        placements, failed = pack(g, cut, capacity, packing)
        if not failed:
            return Packed(placements, sorted(split), packing)
        new = {_worst_step(g, cut, iv) for iv in failed} - split
        if not new:  # every failing interval is already a one-step piece at a split step: cannot happen
            new = {t for _, s, e in failed for t in range(s, e + 1)} - split
        if not new:
            raise AssertionError("packing failed at split steps whose working sets fit: a bug in pack()")
        split |= new
