"""Belady eviction with addresses chosen online: the scratchpad run as a cache, in a fixed operator order.

At each step the op's missing tensors (biggest first) go to the best-fitting free gap. When no gap is big
enough, the address window to clear is chosen Belady-style: among windows not holding one of the op's own
tensors, the one whose earliest next use is furthest away, fewer evicted bytes (weighted by the cost of
bringing them back) breaking ties. Tensors with no later use leave as soon as their last reader has run.
When the op's own resident tensors fragment the scratchpad so that the rest cannot fit even with every other
tensor gone, the one whose move frees the largest gap is reloaded elsewhere (counted in `relocations`); the
working set fits the scratchpad, so this ends. It never falls back to a whole-step reload.
"""
from __future__ import annotations

import bisect

from memfit.plan.packing import use_lists
from memfit.plan.plan_format import Graph, Placement

INF = 1 << 60


def _best_gap(spans: list[tuple[int, int]], size: int, capacity: int) -> int | None:
    """Smallest free gap of at least `size` bytes between sorted (offset, end) spans, else None."""
    best, best_gap, top = None, INF, 0
    for a, b in spans + [(capacity, capacity)]:
        if a - top >= size and a - top < best_gap:
            best, best_gap = top, a - top
        top = max(top, b)
    return best


def online_belady(g: Graph, order: list[str], capacity: int) -> tuple[list[Placement], dict]:
    uses = use_lists(g, order)

    def next_use(n: str, t: int) -> int:
        s = uses[n]
        k = bisect.bisect_right(s, t)
        return s[k] if k < len(s) else INF

    def reload_cost(n: str) -> int:
        t = g.tensor[n]
        return t.bytes * (2 if t.kind in ("activation", "output") else 1)  # spill store + reload, or reload

    resident: dict[str, tuple[int, int]] = {}  # tensor -> (offset, first step of this residency)
    out: list[Placement] = []
    relocations = 0

    def evict(n: str, t: int) -> None:
        off, start = resident.pop(n)
        if start <= t - 1:  # placed at this very step and not yet used: nothing to record
            out.append(Placement(n, off, start, t - 1))

    for t, name in enumerate(order):
        o = g.op[name]
        req = list(dict.fromkeys(o.inputs + o.outputs))
        pinned = set(req)
        queue = sorted((n for n in req if n not in resident), key=lambda n: (-g.tensor[n].bytes, n))
        while queue:
            n = queue.pop(0)
            size = g.tensor[n].bytes
            spans = sorted((off, off + g.tensor[m].bytes) for m, (off, _) in resident.items())
            off = _best_gap(spans, size, capacity)
            if off is None:
                off = _clear_window(g, resident, pinned, size, capacity, lambda m, t=t: next_use(m, t), reload_cost)
                if off is not None:
                    for m in [m for m, (a, _) in resident.items() if a < off + size and off < a + g.tensor[m].bytes]:
                        evict(m, t)
            if off is None:  # the op's own tensors fragment the space: clear all others first
                for m in [m for m in resident if m not in pinned]:
                    evict(m, t)
                spans = sorted((a, a + g.tensor[m].bytes) for m, (a, _) in resident.items())
                off = _best_gap(spans, size, capacity)
            if off is None:  # still blocked: move the op's own tensor that frees the largest gap (a reload)
                older = [m for m, (_, start) in resident.items() if start < t]
                if older:
                    m = max(older, key=lambda m: (_gap_without(g, resident, m, capacity), -reload_cost(m), m))
                    moved = [m]
                    relocations += 1
                else:  # only tensors placed at this step are left: place them all again, biggest first
                    moved = list(resident)
                for m in moved:
                    evict(m, t)
                queue = sorted([n, *moved, *queue], key=lambda n: (-g.tensor[n].bytes, n))
                continue
            resident[n] = (off, t)
        for n in [n for n in resident if next_use(n, t) == INF]:
            off, start = resident.pop(n)
            out.append(Placement(n, off, start, t))
    return out, {"fell_back": False, "fallback_steps": 0, "relocations": relocations, "packing": "online"}


def _clear_window(g: Graph, resident: dict[str, tuple[int, int]], pinned: set[str], size: int, capacity: int,
                  next_use, reload_cost) -> int | None:
    """Offset of the window of `size` bytes to clear (Belady: its nearest next use furthest away), or None."""
    blocks = sorted((off, off + g.tensor[m].bytes, m) for m, (off, _) in resident.items())
    starts = sorted({0, capacity - size, *(b for _, b, _ in blocks if b + size <= capacity)})
    best, best_key = None, None
    for p in starts:
        victims = [m for a, b, m in blocks if a < p + size and p < b]
        if any(m in pinned for m in victims):
            continue
        key = (min((next_use(m) for m in victims), default=INF), -sum(reload_cost(m) for m in victims))
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def _gap_without(g: Graph, resident: dict[str, tuple[int, int]], drop: str, capacity: int) -> int:
    """Largest free gap if `drop` left the scratchpad."""
    spans = sorted((a, a + g.tensor[m].bytes) for m, (a, _) in resident.items() if m != drop)
    best, top = 0, 0
    for a, b in spans + [(capacity, capacity)]:
        best, top = max(best, a - top), max(top, b)
    return best
