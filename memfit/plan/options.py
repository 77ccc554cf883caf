"""The options every planner takes (memfit.plan.planner.make_plan)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlanOptions:
    planner: str = "auto"  # auto: exact when the graph has <= exact_max_ops ops, else whole (<= whole_max_ops), else heuristic
    time_limit_s: float = 30.0
    num_workers: int = 2
    exact_max_ops: int = 60
    whole_max_ops: int = 2000  # the whole-graph model (memfit.plan.whole) up to this many ops
    whole_prefix_share: float = 0.3  # whole: share of the time for the prefix move (whole_search.prefix_move)
    # where every reload of the best seed sits in its first whole_prefix_max_ops steps; 0: off
    whole_prefix_max_ops: int = 80
    whole_lns_share: float = 0.4  # whole: share of the time for the per-step windows before the whole model
    free_order: bool | None = None  # exact: None = free when <= 40 ops; heuristic: None = free in segments
    max_segment_ops: int = 24  # heuristic: first pass; later passes try 16, 32, 12
    seed: int = 0
    free_segments_max_ops: int = 120  # heuristic with free_order None: segments reorder up to this graph size
    bound: bool = True
    pair_bound_max_ops: int = 600  # the order-pair bound model: up to this many ops
    pair_bound_max_pairs: int = 5000  # ... and unordered op pairs (Inception 2.5-4.4k: proves optimality; DARTS,
    # RandWire 7-28k: proves 0 in its share while taking ~10 s of the plan's time to build)
    bound_max_ops: int = 600  # the all-orders bound model takes about a minute to build on 1000+ ops: skipped  # compute the whole-graph lower bound (memfit.plan.bound) and report the gap to it
    split_bound_share: float = 0.25  # whole/heuristic: at most this share of the time for the split bound
    # (memfit.plan.bound_split) when the row bounds leave the best seed above them; 0: off
    span_bound_share: float = 0.08  # whole/heuristic: at most this share for the span bound (bound_span), run
    # before the split bound where the row bounds leave the best seed above them (off with split_bound_share 0)
    split_piece_ops: int = 12
    bounds_share: float = 0.4  # every all-orders bound together (row, span, split) stops at this share of the
    # time limit, so the search keeps the rest (memfit.plan.planner_bounds: DenseNet-121 at 512 KiB had ~5 of 45 s)
    clock: str = "wall"  # wall: every limit is wall time; work: CP-SAT deterministic time + thread CPU time, which
    # a loaded machine does not shrink (memfit.plan.clock), so runs compare under load
    wall_reserve_s: float = 2.0  # make_plan: no solve runs in the last this many seconds (at most 5%) of the wall
    # limit, kept for what follows the last solve (validation, the plan's labels); the phases share the rest
    wall_cap_s: float | None = None  # work clock: end by about this much wall time anyway (None: 3 x time_limit_s;
    # the clock then reads at least time_limit_s / wall_cap_s x the wall time, memfit.plan.clock)
