"""Divide and conquer for graphs too large to solve whole.

1. Fix a base order (the better of the framework and memory-aware orders by baseline traffic).
2. Cut it where few bytes are live across the cut: dynamic programming over cut positions minimises the summed
   crossing bytes, with every segment between min_ops and max_ops ops.
3. Solve the segments left to right with the exact CP-SAT model (`exact.Segment`): what was resident at the end
   of one segment enters the next at the same offsets (kept for free, or stored/dropped at a cost), and
   tensors needed later pay a store when dropped. Each segment is seeded with a baseline plan of its own ops.
4. Stitch: placements continuing across a cut at the same offset are merged into one.
5. Where the cuts fall matters (a cut inside a transformer block can force a spill the block solved whole
   avoids), so `plan_passes` repeats 2-4 with several segment lengths while time remains, keeps the best
   validated plan, and stops as soon as a plan meets the lower bound (proven optimal, memfit.plan.bound).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from memfit.plan.analysis import use_steps
from memfit.plan.baselines import arena_placements
from memfit.plan.clock import current
from memfit.plan.exact import ExactConfig, Segment, solve_segment
from memfit.plan.plan_format import Graph, Placement, Plan
from memfit.plan.validate import validate


@dataclass
class HeuristicConfig:
    time_limit_s: float = 50.0  # for all segments together (plan_passes: for all passes together)
    max_segment_ops: int = 24
    min_segment_ops: int = 6
    other_segment_ops: tuple[int, ...] = (16, 32, 12)  # plan_passes: segment lengths tried after the first
    free_order: bool = False  # reorder ops inside each segment (slower, sometimes better)
    free_window_ops: int = 10  # lns_passes: window length of its free-order pass
    num_workers: int = 2
    seed: int = 0


def crossing_bytes(g: Graph, order: list[str]) -> list[int]:
    """cross[i] = bytes of tensors used both before step i and at/after it (cut between i-1 and i)."""
    diff = [0] * (len(order) + 1)
    for n, steps in use_steps(g, order).items():
        if len(steps) > 1:
            diff[steps[0] + 1] += g.tensor[n].bytes
            diff[steps[-1] + 1] -= g.tensor[n].bytes
    out, cur = [], 0
    for i in range(len(order)):
        cur += diff[i]
        out.append(cur)
    return out


def choose_cuts(cross: list[int], min_ops: int, max_ops: int) -> list[int]:
    """Segment starts (always including 0) minimising summed crossing bytes; DP over cut positions."""
    n = len(cross)
    if n <= max_ops:
        return [0]
    min_ops = max(1, min(min_ops, max_ops))
    inf = float("inf")
    best = [inf] * (n + 1)  # best[i]: cost of cutting ops[0:i] into valid segments
    prev = [-1] * (n + 1)
    best[0] = 0
    for i in range(1, n + 1):
        for L in range(min_ops, max_ops + 1):
            j = i - L
            if j < 0:
                break
            c = best[j] + (cross[j] if j > 0 else 0)
            if c < best[i]:
                best[i], prev[i] = c, j
    if best[n] == inf:  # n too small for min_ops: fall back to equal pieces
        k = -(-n // max_ops)
        return [i * n // k for i in range(k)]
    cuts, i = [], n
    while i > 0:
        i = prev[i]
        cuts.append(i)
    return sorted(cuts)


def plan_segments(g: Graph, capacity: int, order: list[str], cfg: HeuristicConfig, progress=None) -> tuple[list[str], list[Placement], dict]:
    """Solve the segments of `order` in turn; returns the stitched order, placements and per-segment stats."""
    t0 = current().now()
    starts = choose_cuts(crossing_bytes(g, order), cfg.min_segment_ops, cfg.max_segment_ops)
    bounds = list(zip(starts, starts[1:] + [len(order)]))
    last_use = {n: s[-1] for n, s in use_steps(g, order).items() if s}
    entry: dict[str, int] = {}
    loaded: set[str] = set()
    out_order: list[str] = []
    out_pl: list[Placement] = []
    stats = {"segments": len(bounds), "optimal_segments": 0, "fallback_segments": 0, "segment_lengths": [],
             "segment_objective_bytes": 0}
    for k, (s0, s1) in enumerate(bounds):
        ops = order[s0:s1]
        touched = {n for o in ops for n in g.op[o].inputs + g.op[o].outputs} | set(entry)
        beyond = {n for n in touched if last_use.get(n, -1) >= s1}
        seg = Segment(ops, cfg.free_order, dict(entry), beyond, set(loaded))
        remaining = current().left(t0 + cfg.time_limit_s)
        budget = max(0.5, remaining / (len(bounds) - k))
        hint_pl, _ = arena_placements(g, ops, capacity)
        res = solve_segment(g, capacity, seg, ExactConfig(budget, cfg.num_workers, seed=cfg.seed), (ops, hint_pl))
        stats["segment_lengths"].append(len(ops))
        if res.status == "none":  # no solution in time: use the seed plan (entry tensors stored/dropped)
            stats["fallback_segments"] += 1
            res_order, res_pl = ops, hint_pl
            exit_state: dict[str, int] = {}
        else:
            stats["optimal_segments"] += res.status == "optimal"
            res_order, res_pl, exit_state = res.order, res.placements, res.exit
            stats["segment_objective_bytes"] += res.objective_bytes
        out_order += res_order
        out_pl += [Placement(p.tensor, p.offset, p.start + s0, p.end + s0) for p in res_pl]
        loaded |= {n for n in touched if g.tensor[n].kind in ("input", "weight")}
        entry = exit_state
        if progress is not None:
            progress(k + 1, len(bounds))
    return out_order, merge_adjacent(out_pl), stats


def merge_adjacent(placements: list[Placement]) -> list[Placement]:
    """Join a tensor's placements that touch (end + 1 == start) at the same offset: no store/load between."""
    by: dict[str, list[Placement]] = {}
    for p in placements:
        by.setdefault(p.tensor, []).append(p)
    out: list[Placement] = []
    for pls in by.values():
        pls.sort(key=lambda p: p.start)
        cur = pls[0]
        for p in pls[1:]:
            if p.start == cur.end + 1 and p.offset == cur.offset:
                cur = Placement(cur.tensor, cur.offset, cur.start, p.end)
            else:
                out.append(cur)
                cur = p
        out.append(cur)
    return out


def plan_passes(g: Graph, capacity: int, order: list[str], cfg: HeuristicConfig, target_bytes: int = 0,
                progress=None) -> tuple[list[str], list[Placement], dict]:
    """`plan_segments` with segment lengths cfg.max_segment_ops, then cfg.other_segment_ops, while time
    remains; the first pass gets half the time, the others share the rest. Returns the plan with the least
    validated non-compulsory traffic; stops early once it reaches `target_bytes` (a proven lower bound)."""
    deadline = current().now() + cfg.time_limit_s
    sizes = list(dict.fromkeys([cfg.max_segment_ops, *cfg.other_segment_ops]))
    best: tuple[int, list[str], list[Placement], dict] | None = None
    passes = []
    for i, size in enumerate(sizes):
        remaining = current().left(deadline)
        if best is not None and remaining < 1.0:
            break
        share = remaining / 2 if i == 0 and len(sizes) > 1 else remaining / (len(sizes) - i)
        pcfg = replace(cfg, time_limit_s=max(0.5, share), max_segment_ops=size,
                       min_segment_ops=min(cfg.min_segment_ops, max(1, size // 2)))
        o, pl, st = plan_segments(g, capacity, order, pcfg, progress)
        nc = validate(Plan(g, capacity, o, pl))["non_compulsory_bytes"]
        passes.append({"segment_ops": size, "non_compulsory_bytes": nc, "segments": st["segments"]})
        if best is None or nc < best[0]:
            best = (nc, o, pl, {**st, "segment_ops": size})
        if best[0] <= target_bytes:
            break
    assert best is not None
    return best[1], best[2], {**best[3], "passes": passes}


def improve_windows(g: Graph, capacity: int, order: list[str], placements: list[Placement], cfg: HeuristicConfig,
                    target_bytes: int = 0, progress=None) -> tuple[list[str], list[Placement], dict]:
    """Large-neighbourhood search on a complete plan: re-solve one window of it at a time with the exact model,
    the plan's own state pinned at both ends (what is resident, at which offsets, when the window starts and
    ends). The rest of the plan is unchanged, so a window's result can only lower the whole plan's traffic;
    it is kept when the validated plan moves less. Unlike `plan_segments` no window decides blind of what
    follows it."""
    deadline = current().now() + cfg.time_limit_s
    cur_order, cur = list(order), list(placements)
    best = validate(Plan(g, capacity, cur_order, cur))["non_compulsory_bytes"]
    starts = choose_cuts(crossing_bytes(g, cur_order), cfg.min_segment_ops, cfg.max_segment_ops)
    bounds = list(zip(starts, starts[1:] + [len(cur_order)]))
    stats = {"windows": len(bounds), "windows_improved": 0, "windows_unsolved": 0, "start_bytes": best}
    for k, (s0, s1) in enumerate(bounds):
        remaining = current().left(deadline)
        if remaining < 0.3 or best <= target_bytes:
            break
        got = _solve_window(g, capacity, cur_order, cur, s0, s1, cfg, max(0.3, remaining / (len(bounds) - k)))
        if got is None:
            stats["windows_unsolved"] += 1
        else:
            new_order, new_pl = got
            nc = validate(Plan(g, capacity, new_order, new_pl))["non_compulsory_bytes"]
            if nc < best:
                best, cur_order, cur = nc, new_order, new_pl
                stats["windows_improved"] += 1
        if progress is not None:
            progress(k + 1, len(bounds))
    stats["end_bytes"] = best
    return cur_order, cur, stats


def _solve_window(g: Graph, capacity: int, order: list[str], placements: list[Placement], s0: int, s1: int,
                  cfg: HeuristicConfig, time_s: float) -> tuple[list[str], list[Placement]] | None:
    """Steps s0..s1-1 of the plan re-solved with the plan's state at both ends pinned; None if not solved."""
    ops = order[s0:s1]
    step = {o: i for i, o in enumerate(order)}
    entry = {p.tensor: p.offset for p in placements if p.start < s0 <= p.end}
    exit_ = {p.tensor: p.offset for p in placements if p.start < s1 <= p.end}
    used = {n for o in ops for n in g.op[o].inputs + g.op[o].outputs}
    if any(n not in used and n not in entry for n in exit_):
        return None
    later = {n for n in used | set(entry) if any(step[c] >= s1 for c in g.tensor[n].consumers)
             or (g.tensor[n].kind == "output" and n in exit_)}
    seen_before = {n for p in placements if p.start < s0 for n in [p.tensor]}
    seg = Segment(ops, cfg.free_order, entry, later | set(exit_), seen_before, exit_)
    inside = [Placement(p.tensor, p.offset, max(p.start, s0) - s0, min(p.end, s1 - 1) - s0)
              for p in placements if p.start < s1 and p.end >= s0]
    res = solve_segment(g, capacity, seg, ExactConfig(time_s, cfg.num_workers, seed=cfg.seed), (ops, inside))
    if res.status == "none":
        return None
    outside = []
    for p in placements:  # cut the plan's placements at the window's edges, keep what lies outside
        if p.start < s0:
            outside.append(Placement(p.tensor, p.offset, p.start, min(p.end, s0 - 1)))
        if p.end >= s1:
            outside.append(Placement(p.tensor, p.offset, max(p.start, s1), p.end))
    new = outside + [Placement(p.tensor, p.offset, p.start + s0, p.end + s0) for p in res.placements]
    return order[:s0] + res.order + order[s1:], merge_adjacent(new)


def lns_passes(g: Graph, capacity: int, order: list[str], placements: list[Placement], cfg: HeuristicConfig,
               target_bytes: int = 0, progress=None) -> tuple[list[str], list[Placement], dict]:
    """`improve_windows` with window lengths cfg.max_segment_ops, then cfg.other_segment_ops (the cuts move,
    so a spill one window could not see across is inside the next pass's window), while time remains."""
    deadline = current().now() + cfg.time_limit_s
    # (window ops, order free inside): fixed-order windows solve fast; short free-order windows reorder
    sizes = [(cfg.max_segment_ops, False), (cfg.free_window_ops, True), *((n, False) for n in cfg.other_segment_ops)]
    passes = []
    for i, (size, free) in enumerate(sizes):
        remaining = current().left(deadline)
        if remaining < 1.0 or (passes and passes[-1]["non_compulsory_bytes"] <= target_bytes):
            break
        share = remaining / 3 if i < 2 else remaining / (len(sizes) - i)
        pcfg = replace(cfg, time_limit_s=share, max_segment_ops=size, free_order=free,
                       min_segment_ops=min(cfg.min_segment_ops, max(1, size // 2)))
        order, placements, st = improve_windows(g, capacity, order, placements, pcfg, target_bytes, progress)
        passes.append({"segment_ops": size, "free_order": free, "non_compulsory_bytes": st["end_bytes"],
                       "segments": st["windows"], "improved": st["windows_improved"],
                       "unsolved": st["windows_unsolved"]})
    return order, placements, {"method": "windows of the seed plan (LNS)", "passes": passes}
