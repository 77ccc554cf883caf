"""Graph facts every planner needs: working sets, live ranges under an order, orders, the three scratchpad sizes."""
from __future__ import annotations

from dataclasses import dataclass

from memfit.plan.errors import InfeasibleScratchpadError, PlanError
from memfit.plan.plan_format import Graph
from memfit.plan.sizes import parse_size

SCRATCHPAD_KEYWORDS = ("min-feasible", "min-peak", "mid")  # --scratchpad's named sizes (resolve_scratchpad)


def max_working_set(g: Graph) -> tuple[str, int]:
    """The op with the largest working set and its bytes: no plan fits a smaller scratchpad."""
    best = max(g.ops, key=g.working_set)
    return best.name, g.working_set(best)


def check_feasible(g: Graph, scratchpad_bytes: int) -> None:
    """Raise InfeasibleScratchpadError naming the op with the largest working set if it exceeds the scratchpad
    (so the message also gives the smallest scratchpad that can work)."""
    name, need = max_working_set(g)
    if need > scratchpad_bytes:
        raise InfeasibleScratchpadError(name, need, scratchpad_bytes)


def use_steps(g: Graph, order: list[str]) -> dict[str, list[int]]:
    """Sorted steps at which each tensor must be resident (producer step and consumer steps)."""
    step = {n: i for i, n in enumerate(order)}
    uses: dict[str, list[int]] = {t.name: [] for t in g.tensors}
    for o in g.ops:
        for n in set(o.inputs) | set(o.outputs):
            uses[n].append(step[o.name])
    for v in uses.values():
        v.sort()
    return uses


def live_ranges(g: Graph, order: list[str]) -> dict[str, tuple[int, int]]:
    """Spill-free residency of each used tensor: first use (or production) to last use."""
    return {n: (s[0], s[-1]) for n, s in use_steps(g, order).items() if s}


def peak_live_bytes(g: Graph, order: list[str]) -> int:
    """Peak of summed live bytes with no spills and no fragmentation (inputs/weights loaded just in time)."""
    delta = [0] * (len(order) + 1)
    for n, (a, b) in live_ranges(g, order).items():
        delta[a] += g.tensor[n].bytes
        delta[b + 1] -= g.tensor[n].bytes
    peak = cur = 0
    for d in delta[:-1]:
        cur += d
        peak = max(peak, cur)
    return peak


def memory_aware_order(g: Graph) -> list[str]:
    """Greedy list schedule: among ready ops run the one with the smallest (bytes newly live - bytes freed).

    Ties go to the framework order, so on a chain this is the framework order."""
    index = {o.name: i for i, o in enumerate(g.ops)}
    preds = {o.name: {g.tensor[n].producer for n in o.inputs if g.tensor[n].producer} for o in g.ops}
    succs: dict[str, set[str]] = {o.name: set() for o in g.ops}
    for o, ps in preds.items():
        for p in ps:
            succs[p].add(o)
    waiting = {o: len(ps) for o, ps in preds.items()}
    remaining_uses = {t.name: len(t.consumers) for t in g.tensors}
    live: set[str] = set()
    ready = [o.name for o in g.ops if waiting[o.name] == 0]
    order: list[str] = []
    while ready:
        def score(name: str, live: set[str] = live) -> tuple[int, int]:
            o = g.op[name]
            new = sum(g.tensor[n].bytes for n in set(o.inputs) | set(o.outputs) if n not in live)
            freed = sum(g.tensor[n].bytes for n in set(o.inputs) if remaining_uses[n] == 1)
            freed += sum(g.tensor[n].bytes for n in o.outputs if not g.tensor[n].consumers)
            return (new - freed, index[name])
        best = min(ready, key=score)
        ready.remove(best)
        order.append(best)
        o = g.op[best]
        live |= set(o.inputs) | set(o.outputs)
        for n in set(o.inputs):
            remaining_uses[n] -= 1
            if remaining_uses[n] == 0:
                live.discard(n)
        for s in succs[best]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    if len(order) != len(g.ops):
        raise PlanError(f"graph '{g.model}' has a cycle; cannot order its ops")
    return order


@dataclass
class ScratchpadSizes:
    min_feasible: int  # largest op working set
    min_peak: int  # lowest spill-free peak found over the orders tried
    mid: int

    def as_dict(self) -> dict[str, int]:
        return {"min-feasible": self.min_feasible, "min-peak": self.min_peak, "mid": self.mid}


def scratchpad_sizes(g: Graph) -> ScratchpadSizes:
    """The issue's per-model sizes. min_peak is the best of the framework and memory-aware orders (exact
    minimum-peak ordering is NP-hard), and never below min_feasible."""
    _, feasible = max_working_set(g)
    peak = min(peak_live_bytes(g, g.topo_order()), peak_live_bytes(g, memory_aware_order(g)))
    peak = max(peak, feasible)
    return ScratchpadSizes(feasible, peak, (feasible + peak) // 2)


def resolve_scratchpad(g: Graph, spec: str | int) -> int:
    """'min-feasible' | 'min-peak' | 'mid' | bytes | '1.5MiB' -> bytes."""
    if isinstance(spec, str) and spec.strip().lower() in SCRATCHPAD_KEYWORDS:
        return scratchpad_sizes(g).as_dict()[spec.strip().lower()]
    return parse_size(spec)


def topo_successors(g: Graph) -> dict[str, set[str]]:
    """Op -> ops that read one of its outputs."""
    out: dict[str, set[str]] = {o.name: set() for o in g.ops}
    for t in g.tensors:
        if t.producer:
            out[t.producer].update(t.consumers)
    return out



def without_weights(g: Graph) -> Graph:
    """The same graph with weights streamed past the scratchpad (not resident): weight tensors removed."""
    from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph

    keep = {t.name for t in g.tensors if t.kind != "weight"}
    tensors = [TensorSpec(t.name, t.bytes, t.kind) for t in g.tensors if t.name in keep]
    ops = [OpSpec(o.name, [n for n in o.inputs if n in keep], list(o.outputs), o.type) for o in g.ops]
    return build_graph(g.model, tensors, ops)


def subgraph(g: Graph, ops: list[str], name: str | None = None) -> Graph:
    """The ops `ops` (a slice of a topological order) as a graph of their own: tensors written outside become
    inputs, tensors read outside (or graph outputs) become outputs. For solving real sub-networks exactly."""
    from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph

    inside = set(ops)
    used = list(dict.fromkeys(n for o in ops for n in g.op[o].inputs + g.op[o].outputs))
    tensors = []
    for n in used:
        t = g.tensor[n]
        if t.producer is not None and t.producer not in inside:
            kind = "input"
        elif t.producer is not None and (t.kind == "output" or any(c not in inside for c in t.consumers)):
            kind = "output"
        else:
            kind = t.kind
        tensors.append(TensorSpec(n, t.bytes, kind))
    sub_ops = [OpSpec(o, list(g.op[o].inputs), list(g.op[o].outputs), g.op[o].type) for o in ops]
    return build_graph(name or f"{g.model}[{ops[0]}..{ops[-1]}]", tensors, sub_ops)
