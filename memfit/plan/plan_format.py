"""The memfit.plan/v1 format: one graph + plan description shared by every planner (see docs/plan-format.md).

A `Graph` is the planner's input (operators and tensors with exact byte sizes). A `Plan` adds the decisions:
execution `order`, and `placements` (residency intervals at byte offsets). Loads/stores are implied by the
placements (rules in `memfit.plan.validate`), so no planner can report traffic that its plan does not cause.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

FORMAT = "memfit.plan/v1"
KINDS = ("input", "weight", "activation", "output")


@dataclass
class TensorSpec:
    name: str
    bytes: int
    kind: str  # one of KINDS
    producer: str | None = None  # op name; None for inputs and weights
    consumers: list[str] = field(default_factory=list)


@dataclass
class OpSpec:
    name: str
    inputs: list[str]
    outputs: list[str]
    type: str = ""  # e.g. "aten.conv2d"; informational only


@dataclass
class Graph:
    """Operators and tensors of one network; `ops` is listed in the framework's (topological) order."""

    model: str
    tensors: list[TensorSpec]
    ops: list[OpSpec]

    @cached_property
    def tensor(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def op(self) -> dict[str, OpSpec]:
        return {o.name: o for o in self.ops}

    def working_set(self, op: OpSpec) -> int:
        """Bytes that must be resident while `op` runs: its distinct inputs and outputs."""
        return sum(self.tensor[n].bytes for n in set(op.inputs) | set(op.outputs))

    def topo_order(self) -> list[str]:
        return [o.name for o in self.ops]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tensors": [asdict(t) for t in self.tensors],
            "ops": [_op_dict(o) for o in self.ops],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Graph:
        tensors = [TensorSpec(t["name"], t["bytes"], t["kind"], t.get("producer"), list(t.get("consumers", [])))
                   for t in d["tensors"]]
        ops = [OpSpec(o["name"], list(o["inputs"]), list(o["outputs"]), o.get("type", "")) for o in d["ops"]]
        return Graph(d.get("model", ""), tensors, ops)


@dataclass
class Placement:
    """One residency interval: `tensor` occupies [offset, offset+bytes) during steps start..end inclusive."""

    tensor: str
    offset: int
    start: int
    end: int


@dataclass
class SolverInfo:
    """How the plan was found. status: optimal | feasible | heuristic | baseline | fallback."""

    status: str
    time_s: float
    objective_bytes: int | None = None  # non-compulsory bytes the solver believes it achieved
    bound_bytes: int | None = None  # proven lower bound on non-compulsory bytes (None: unknown)
    gap: float | None = None  # (plan - bound) / plan; 0 when optimal
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    graph: Graph
    scratchpad_bytes: int
    order: list[str]
    placements: list[Placement]
    planner: str = ""
    solver: SolverInfo | None = None
    traffic: dict[str, int] | None = None  # filled by memfit.plan.validate.traffic

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "model": self.graph.model, "scratchpad_bytes": self.scratchpad_bytes}
        g = self.graph.to_dict()
        d["tensors"], d["ops"] = g["tensors"], g["ops"]
        d["order"] = list(self.order)
        d["placements"] = [asdict(p) for p in self.placements]
        d["planner"] = self.planner
        if self.solver is not None:
            d["solver"] = asdict(self.solver)
        if self.traffic is not None:
            d["traffic"] = dict(self.traffic)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Plan:
        """Build a Plan from JSON data without checking the rules (use memfit.plan.validate for that)."""
        solver = SolverInfo(**d["solver"]) if isinstance(d.get("solver"), dict) else None
        return Plan(
            graph=Graph.from_dict(d),
            scratchpad_bytes=d["scratchpad_bytes"],
            order=list(d["order"]),
            placements=[Placement(p["tensor"], p["offset"], p["start"], p["end"]) for p in d["placements"]],
            planner=d.get("planner", ""),
            solver=solver,
            traffic=d.get("traffic"),
        )


def _op_dict(o: OpSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": o.name, "inputs": list(o.inputs), "outputs": list(o.outputs)}
    if o.type:
        d["type"] = o.type
    return d


def build_graph(model: str, tensors: list[TensorSpec], ops: list[OpSpec]) -> Graph:
    """Fill every tensor's producer/consumers from the ops, so extractors only list op inputs/outputs."""
    by_name = {t.name: t for t in tensors}
    for t in tensors:
        t.producer, t.consumers = None, []
    for o in ops:
        for n in o.outputs:
            by_name[n].producer = o.name
        for n in dict.fromkeys(o.inputs):  # an op reading a tensor twice is one consumer
            by_name[n].consumers.append(o.name)
    return Graph(model, tensors, ops)
