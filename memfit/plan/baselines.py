"""Baselines in the same harness: an order (framework topological or memory-aware), eviction by Belady
(furthest next use) or largest-first, then a TFLite-style greedy-by-size arena for addresses.

Two phases, as a runtime with an offline arena would do it: (1) decide residency intervals under a byte
budget, evicting when the resident bytes exceed it; (2) give each interval an offset, biggest first, in the
smallest gap free for its whole interval. When fragmentation defeats (2), (1) is re-run with a smaller byte
budget (bisection); if nothing fits, every op's tensors are loaded for its own step only (always feasible).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from memfit.plan.analysis import check_feasible, memory_aware_order
from memfit.plan.plan_format import Graph, Placement, Plan, SolverInfo

INF = 1 << 60


@dataclass
class BaselineConfig:
    order: str = "topo"  # topo | memory
    eviction: str = "belady"  # belady | largest


def _uses(g: Graph, order: list[str]) -> dict[str, list[int]]:
    """Steps at which each tensor is read or written by the ops in `order` (which may be a sub-sequence)."""
    uses: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        o = g.op[name]
        for n in dict.fromkeys(o.inputs + o.outputs):
            uses.setdefault(n, []).append(i)
    return uses


def residency(g: Graph, order: list[str], budget: int, eviction: str = "belady") -> list[tuple[str, int, int]]:
    """Phase 1: residency intervals (tensor, start, end) keeping resident bytes <= budget where possible."""
    uses = _uses(g, order)

    def next_use(n: str, t: int) -> int:
        s = uses[n]
        k = bisect.bisect_right(s, t)
        return s[k] if k < len(s) else INF

    resident: dict[str, int] = {}  # tensor -> start step
    total = 0
    out: list[tuple[str, int, int]] = []
    for t, name in enumerate(order):
        o = g.op[name]
        req = set(o.inputs) | set(o.outputs)
        for n in req:
            if n not in resident:
                resident[n] = t
                total += g.tensor[n].bytes
        if total > budget:
            if eviction == "belady":
                key = lambda n, t=t: (-next_use(n, t), -g.tensor[n].bytes)
            else:
                key = lambda n, t=t: (-g.tensor[n].bytes, -next_use(n, t))
            for n in sorted((n for n in resident if n not in req), key=key):
                if total <= budget:
                    break
                out.append((n, resident.pop(n), t - 1))
                total -= g.tensor[n].bytes
        for n in [n for n in resident if next_use(n, t) == INF]:
            out.append((n, resident.pop(n), t))
            total -= g.tensor[n].bytes
    return out


def greedy_by_size(g: Graph, intervals: list[tuple[str, int, int]], capacity: int) -> list[Placement] | None:
    """Phase 2, TFLite-style: biggest first, into the smallest address gap free over its interval; None if it
    does not fit in `capacity`."""
    placed: list[tuple[int, int, int, int]] = []  # (start, end, offset, offset_end)
    result: list[Placement] = []
    for n, s, e in sorted(intervals, key=lambda x: (-g.tensor[x[0]].bytes, x[1], x[0])):
        size = g.tensor[n].bytes
        busy = sorted((a, b) for (ps, pe, a, b) in placed if ps <= e and s <= pe)
        best, best_gap, top = None, INF, 0
        for a, b in busy:
            if a - top >= size and a - top < best_gap:
                best, best_gap = top, a - top
            top = max(top, b)
        if best is None:
            best = top
        if best + size > capacity:
            return None
        placed.append((s, e, best, best + size))
        result.append(Placement(n, best, s, e))
    return result


def per_step_placements(g: Graph, order: list[str]) -> list[Placement]:
    """Always-feasible fallback: each op's tensors resident only during its own step, packed from offset 0."""
    out: list[Placement] = []
    for t, name in enumerate(order):
        o = g.op[name]
        off = 0
        for n in dict.fromkeys(o.inputs + o.outputs):
            out.append(Placement(n, off, t, t))
            off += g.tensor[n].bytes
    return out


def arena_placements(g: Graph, order: list[str], capacity: int, eviction: str = "belady") -> tuple[list[Placement], int]:
    """Residency + greedy-by-size with budget bisection; returns placements and the byte budget that worked
    (0 = per-step fallback)."""
    got = greedy_by_size(g, residency(g, order, capacity, eviction), capacity)
    if got is not None:
        return got, capacity
    lo = max((sum(g.tensor[n].bytes for n in set(g.op[x].inputs) | set(g.op[x].outputs)) for x in order), default=0)
    hi, best = capacity - 1, None
    for _ in range(12):  # bisection over the phase-1 budget; not monotone, so keep the best budget that fit
        if lo > hi:
            break
        mid = (lo + hi) // 2
        got = greedy_by_size(g, residency(g, order, mid, eviction), capacity)
        if got is not None:
            best, lo = (got, mid), mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return best
    return per_step_placements(g, order), 0


def plan_baseline(g: Graph, scratchpad_bytes: int, config: BaselineConfig | None = None) -> Plan:
    cfg = config or BaselineConfig()
    check_feasible(g, scratchpad_bytes)
    t0 = time.perf_counter()
    order = g.topo_order() if cfg.order == "topo" else memory_aware_order(g)
    placements, budget = arena_placements(g, order, scratchpad_bytes, cfg.eviction)
    info = SolverInfo("baseline", time.perf_counter() - t0, details={"phase1_budget_bytes": budget, **vars(cfg)})
    name = f"baseline-{cfg.order}" + ("" if cfg.eviction == "belady" else f"-{cfg.eviction}")
    return Plan(g, scratchpad_bytes, order, placements, planner=name, solver=info)


BASELINES = {
    "baseline-topo": BaselineConfig("topo", "belady"),
    "baseline-topo-largest": BaselineConfig("topo", "largest"),
    "baseline-memory": BaselineConfig("memory", "belady"),
    "baseline-memory-largest": BaselineConfig("memory", "largest"),
}
