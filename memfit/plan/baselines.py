"""Baselines in the same harness as memfit's planners.

Two-phase (as a runtime with an offline arena does it): an order (framework topological or memory-aware),
(1) residency intervals under a byte budget, evicting by Belady (furthest next use) or largest-first when the
resident bytes exceed it, then (2) addresses for the intervals with TFLite's GreedyBySize and GreedyByBreadth
packings (memfit.plan.packing). Fragmentation can defeat (2) at the full budget, so (1) is re-run at a ladder
of smaller budgets and the plan with the least traffic is kept. Where an interval still does not fit, the
fallback is local to the failing steps (packing.pack_local_fallback), and the plan says so in
`solver.details["fell_back"]` and `["fallback_steps"]`.

`baseline-belady` (memfit.plan.belady) is Belady eviction in the graph's own order with addresses chosen
online, the design of a cache-like scratchpad manager.
"""
from __future__ import annotations

import bisect
import time
from collections import defaultdict
from dataclasses import dataclass

from memfit.plan.analysis import check_feasible, memory_aware_order
from memfit.plan.packing import PACKINGS, Interval, Packed, pack_local_fallback, use_lists
from memfit.plan.plan_format import Graph, Placement, Plan, SolverInfo
from memfit.plan.validate import compute_traffic

INF = 1 << 60
# phase-1 budgets tried, as fractions of the scratchpad (fragmentation makes the best one unpredictable)
BUDGET_LADDER = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


@dataclass
class BaselineConfig:
    order: str = "topo"  # topo | memory
    eviction: str = "belady"  # belady | largest | online (memfit.plan.belady: addresses chosen as it runs)


def residency(g: Graph, order: list[str], budget: int, eviction: str = "belady") -> list[Interval]:
    """Phase 1: residency intervals (tensor, start, end) keeping resident bytes <= budget where possible."""
    uses = use_lists(g, order)

    def next_use(n: str, t: int) -> int:
        s = uses[n]
        k = bisect.bisect_right(s, t)
        return s[k] if k < len(s) else INF

    resident: dict[str, int] = {}  # tensor -> start step
    total = 0
    out: list[Interval] = []
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


def non_compulsory(g: Graph, order: list[str], placements: list[Placement]) -> int:
    by: dict[str, list[Placement]] = defaultdict(list)
    for p in placements:
        by[p.tensor].append(p)
    return compute_traffic(g, order, by)["non_compulsory_bytes"]


def arena_placements(g: Graph, order: list[str], capacity: int, eviction: str = "belady") -> tuple[list[Placement], dict]:
    """Residency + packing over the budget ladder and both packings; the plan with the least non-compulsory
    traffic (fewest fallback steps on ties). Returns placements and what was chosen."""
    best: tuple[tuple[int, int], Packed, int] | None = None
    for frac in BUDGET_LADDER:
        budget = int(capacity * frac)
        intervals = residency(g, order, budget, eviction)
        clean = False
        for packing in PACKINGS:
            got = pack_local_fallback(g, order, intervals, capacity, packing)
            key = (non_compulsory(g, order, got.placements), len(got.split_steps))
            clean |= not got.split_steps
            if best is None or key < best[0]:
                best = (key, got, budget)
        if clean:
            break  # this budget packs without a fallback: smaller budgets only evict more
    assert best is not None
    (_, steps), packed, budget = best
    return packed.placements, {"phase1_budget_bytes": budget, "packing": packed.packing, "fell_back": steps > 0,
                               "fallback_steps": steps, "fallback_at": packed.split_steps[:50]}


def ideal_belady_bytes(g: Graph, order: list[str], capacity: int) -> int:
    """Belady eviction at the full scratchpad with addresses ignored (no fragmentation): a reference figure,
    not a plan (no addresses exist that realise it in general)."""
    pls = [Placement(n, 0, s, e) for n, s, e in residency(g, order, capacity, "belady")]
    return non_compulsory(g, order, pls)


def plan_baseline(g: Graph, scratchpad_bytes: int, config: BaselineConfig | None = None) -> Plan:
    cfg = config or BaselineConfig()
    check_feasible(g, scratchpad_bytes)
    t0 = time.perf_counter()
    order = g.topo_order() if cfg.order == "topo" else memory_aware_order(g)
    if cfg.eviction == "online":
        from memfit.plan.belady import online_belady

        placements, details = online_belady(g, order, scratchpad_bytes)
    else:
        placements, details = arena_placements(g, order, scratchpad_bytes, cfg.eviction)
    info = SolverInfo("baseline", time.perf_counter() - t0, details={**details, **vars(cfg)})
    return Plan(g, scratchpad_bytes, order, placements, planner=baseline_name(cfg), solver=info)


def baseline_name(cfg: BaselineConfig) -> str:
    if cfg.eviction == "online":
        return "baseline-belady" + ("" if cfg.order == "topo" else "-memory")
    return f"baseline-{cfg.order}" + ("" if cfg.eviction == "belady" else f"-{cfg.eviction}")


BASELINES = {baseline_name(c): c for c in (
    BaselineConfig("topo", "belady"), BaselineConfig("topo", "largest"), BaselineConfig("memory", "belady"),
    BaselineConfig("memory", "largest"), BaselineConfig("topo", "online"), BaselineConfig("memory", "online"))}
