"""The all-orders lower bounds a planner reports beside its plan: the four row bounds, then the split bound where
they leave the best seed above them (memfit.plan.bound, bound_cut, bound_every, bound_cover, bound_span,
bound_split)."""
from __future__ import annotations

from memfit.plan.bound import LowerBound, lower_bound, unordered_pairs
from memfit.plan.clock import current
from memfit.plan.options import PlanOptions
from memfit.plan.plan_format import Graph, Plan


def all_orders_bound(g: Graph, scratchpad_bytes: int, opts: PlanOptions) -> LowerBound | None:
    """The best of the all-orders bounds: the order-pair CP-SAT model (memfit.plan.bound, up to
    pair_bound_max_ops ops: it can take a minute to build above that), the every-order covering model
    (bound_every), the min-cut bound (bound_cut) and the covering model over both kinds of rows
    (bound_cover). Each is valid for every order, so their max is too. All of them together (with the span and
    split bounds after them, with_split_bound) take at most opts.bounds_share of the time limit: each gets its
    share or what is left of that, whichever is less, and one with under half a second left is not run (its
    part says "no time"): a bound left out only leaves the bound lower, never wrong."""
    if not opts.bound:
        return None
    from memfit.plan.bound_cover import cover_bound
    from memfit.plan.bound_cut import cut_bound
    from memfit.plan.bound_every import every_order_bound

    end = current().now() + opts.bounds_share * opts.time_limit_s

    def limit(share: float) -> float | None:
        left = current().left(end)
        return min(share, left) if left >= 0.5 else None

    share = min(5.0, max(0.5, 0.1 * opts.time_limit_s))
    # the cover model (both kinds of rows, shared evictions; its rows repeat the min cuts) needs more: 9 s at 45 s
    cover_share = min(10.0, max(1.0, 0.2 * opts.time_limit_s))
    found: dict[str, LowerBound | None] = {"min-cut": cut_bound(g, scratchpad_bytes, share)}
    t = limit(share)
    every = found["every-order"] = every_order_bound(g, scratchpad_bytes, t, opts.num_workers) if t else None
    cut = found["min-cut"]
    if every is not None and cut.status == every.status == "optimal" and cut.bytes == 0 and not every.tight_ops:
        # no op has a min-cut excess and none a forced-live excess: the cover model has no row that costs
        # anything, so its bound is 0 (it would spend 20% of the time finding that: 10 s on NASNet at 4 MiB)
        found["cover"] = LowerBound(0, "all orders", "optimal", 0.0)
    else:
        # limited by what is left of the bounds' budget: CP-SAT overshoots a deterministic limit on these models
        # (DenseNet-121 at 512 KiB on the work clock: every-order 8.5 s for a limit of 4.5, cover 13.7 for 9,
        # order pairs 6.0 for 4.5), and without the budget the bounds took ~38 of 45 s there, the search ~5
        t = limit(cover_share)
        found["cover"] = cover_bound(g, scratchpad_bytes, t, opts.num_workers) if t else None
    if len(g.ops) <= min(opts.bound_max_ops, opts.pair_bound_max_ops) and \
            unordered_pairs(g) <= opts.pair_bound_max_pairs:
        t = limit(share)
        found["order-pairs"] = lower_bound(g, scratchpad_bytes, time_limit_s=t, num_workers=opts.num_workers) \
            if t else None
    ran = [b for b in found.values() if b is not None]
    best = max(ran, key=lambda b: b.bytes)
    best.parts = {n: {"bytes": b.bytes, "status": b.status, "time_s": round(b.time_s, 2)} if b is not None else
                  {"bytes": 0, "status": "no time", "time_s": 0.0} for n, b in found.items()}
    best.time_s = sum(b.time_s for b in ran)
    return best


def with_split_bound(g: Graph, scratchpad_bytes: int, opts: PlanOptions, lb: LowerBound | None, seed: Plan,
           t0: float) -> LowerBound | None:
    """Raise the row bounds with the span bound (memfit.plan.bound_span) and the split bound
    (memfit.plan.bound_split) where they leave the best seed above them. The span bound gets span_bound_share of
    the time limit, then the split bound split_bound_share (each at most half of what is left); both skip the
    pieces that fit spill-free, and stop once the bound reaches the seed's traffic (the seed is then proven
    optimal and the planner returns it without searching). Each sum is valid over all orders, so the max with
    the row bounds is."""
    if lb is None or opts.split_bound_share <= 0 or seed.traffic["non_compulsory_bytes"] <= lb.bytes:
        return lb
    from memfit.plan.bound_span import span_bound
    from memfit.plan.bound_split import split_bound

    # the span bound first, on a share of its own (it charges the tensors live across pieces: 2 s on PNASNet-5
    # at 2 MiB, where the split bound proved 0 in 13 s); taking it out of the split bound's share cost that
    # bound 6.21 -> 1.90 MB on DARTS 256 KiB
    enough = seed.traffic["non_compulsory_bytes"]
    budget = opts.bounds_share * opts.time_limit_s  # for every bound together, the row bounds' time spent
    span_s = min(opts.span_bound_share * opts.time_limit_s, 0.5 * (opts.time_limit_s - (current().now() - t0)),
                 budget - lb.time_s)
    if span_s >= 0.5:
        sp = span_bound(g, scratchpad_bytes, opts.split_piece_ops, span_s, opts.num_workers, enough_bytes=enough)
        lb.parts["span"] = {"bytes": sp.bytes, "status": sp.status, "time_s": round(sp.time_s, 2),
                            "pieces_solved": len(sp.pieces), "pieces_skipped": sp.skipped}
        lb.time_s += sp.time_s
        if sp.bytes > lb.bytes:
            lb.bytes, lb.status = sp.bytes, "bound"
        if lb.bytes >= enough:
            return lb
    else:
        lb.parts["span"] = {"bytes": 0, "status": "no time", "time_s": 0.0}
    budget = min(opts.split_bound_share * opts.time_limit_s, 0.5 * (opts.time_limit_s - (current().now() - t0)),
                 budget - lb.time_s)
    if budget < 0.5:
        lb.parts["split"] = {"bytes": 0, "status": "no time", "time_s": 0.0}
        return lb
    sb = split_bound(g, scratchpad_bytes, opts.split_piece_ops, budget, opts.num_workers,
                     enough_bytes=enough, skip_fitting=True)
    lb.parts["split"] = {"bytes": sb.bytes, "status": sb.status, "time_s": round(sb.time_s, 2),
                         "pieces": len(sb.pieces) + sb.skipped, "pieces_solved": len(sb.pieces),
                         "pieces_proven": sum(p["status"] == "optimal" for p in sb.pieces),
                         "pieces_skipped_fitting": sb.skipped, "piece_ops": opts.split_piece_ops}
    lb.time_s += sb.time_s
    if sb.bytes > lb.bytes:
        lb.bytes, lb.status = sb.bytes, "bound"
    return lb
