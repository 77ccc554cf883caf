"""Check a plan against the memfit.plan/v1 rules and count the off-chip traffic it implies.

Traffic rules (docs/plan-format.md): a placement *loads* its tensor at `start` unless `order[start]` produces
it; it *stores* at `end` if the tensor is an activation/output with a later placement (a spill), or it is a
graph output's last placement. Compulsory: each consumed input/weight loaded once, each output stored once.
"""
from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from memfit.plan.errors import PlanValidationError
from memfit.plan.plan_format import FORMAT, KINDS, Graph, Placement, Plan
from memfit.plan.sizes import MAX_BYTES, approx


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; raises PlanValidationError listing every broken rule."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanValidationError([f"cannot read {path} as JSON: {exc}"]) from None
    except UnicodeDecodeError as exc:  # a binary file (a PNG given for the plan): JSON is UTF-8 text
        raise PlanValidationError([f"cannot read {path} as JSON: it is not UTF-8 text ({exc.reason} at byte "
                                   f"{exc.start})"]) from None
    plan = _structure(data)
    validate(plan, stored_traffic=data.get("traffic"))
    return plan


def _structure(data: Any) -> Plan:
    """Type checks on raw JSON, so the rule checks below never hit a KeyError, a TypeError (a null or an object
    where a name belongs: names are compared, sorted and hashed) or an AttributeError."""
    p: list[str] = []
    if not isinstance(data, dict):
        raise PlanValidationError(["top level must be a JSON object"])
    if data.get("format") != FORMAT:
        p.append(f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
    for key, typ in (("scratchpad_bytes", int), ("tensors", list), ("ops", list), ("order", list), ("placements", list)):
        if not isinstance(data.get(key), typ) or isinstance(data.get(key), bool):
            p.append(f"'{key}' must be a {typ.__name__}")
    for key in ("model", "planner"):  # optional; printed and written back as strings
        if key in data and not isinstance(data[key], str):
            p.append(f"'{key}' must be a string")
    p.extend(_solver_problems(data.get("solver")))
    traffic = data.get("traffic")
    if traffic is not None and not (isinstance(traffic, dict) and all(_is_int(v) for v in traffic.values())):
        p.append("'traffic' must be an object of integer byte counts (or absent)")
    if p:
        raise PlanValidationError(p)
    for i, t in enumerate(data["tensors"]):
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and _is_int(t.get("bytes"))
                and isinstance(t.get("kind"), str) and isinstance(t.get("producer"), (str, type(None)))
                and _is_names(t.get("consumers", []))):
            p.append(f"tensors[{i}] needs 'name' (string), 'bytes' (integer), 'kind' (string), 'producer' (op name "
                     f"or null), 'consumers' (list of op names)")
    for i, o in enumerate(data["ops"]):
        if not (isinstance(o, dict) and isinstance(o.get("name"), str) and _is_names(o.get("inputs"))
                and _is_names(o.get("outputs")) and isinstance(o.get("type", ""), str)):
            p.append(f"ops[{i}] needs 'name' (string), 'inputs' and 'outputs' (lists of tensor names)")
    for i, name in enumerate(data["order"]):
        if not isinstance(name, str):
            p.append(f"order[{i}] must be an op name (string), got {json.dumps(name)}")
    for i, pl in enumerate(data["placements"]):
        if not (isinstance(pl, dict) and isinstance(pl.get("tensor"), str)
                and all(_is_int(pl.get(k)) for k in ("offset", "start", "end"))):
            p.append(f"placements[{i}] needs 'tensor' (string) and integer 'offset', 'start', 'end'")
    if p:
        raise PlanValidationError(p)
    return Plan.from_dict(data)


# solver's fields (plan_format.SolverInfo): the JSON types each may hold, and how to say so; status and time_s
# are required
_NONE = type(None)
_SOLVER_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "status": ((str,), "a string"), "time_s": ((int, float), "a number"),
    "objective_bytes": ((int, _NONE), "an integer or null"), "bound_bytes": ((int, _NONE), "an integer or null"),
    "gap": ((int, float, _NONE), "a number or null"), "details": ((dict,), "an object")}


def _solver_problems(solver: Any) -> list[str]:
    if solver is None:  # optional: a plan written by hand need not say how it was found
        return []
    if not isinstance(solver, dict):
        return ["'solver' must be an object (or absent)"]
    p = [f"'solver' needs '{k}'" for k in ("status", "time_s") if k not in solver]
    p += [f"'solver' has an unknown field '{k}'; known: {', '.join(_SOLVER_FIELDS)}" for k in solver
          if k not in _SOLVER_FIELDS]
    p += [f"'solver.{k}' must be {what}" for k, (types, what) in _SOLVER_FIELDS.items()
          if k in solver and (not isinstance(solver[k], types) or isinstance(solver[k], bool))]
    return p


def _is_names(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(n, str) for n in x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_graph(g: Graph) -> list[str]:
    """Consistency of tensors and ops: unique names, kinds, producer/consumer links."""
    p: list[str] = []
    if len(g.tensor) != len(g.tensors):
        p.append("tensor names are not unique")
    if len(g.op) != len(g.ops):
        p.append("op names are not unique")
    producers: dict[str, str] = {}
    consumers: dict[str, set[str]] = defaultdict(set)
    for o in g.ops:
        for n in o.inputs + o.outputs:
            if n not in g.tensor:
                p.append(f"op '{o.name}' refers to unknown tensor '{n}'")
        for n in o.outputs:
            if n in producers:
                p.append(f"tensor '{n}' is produced by both '{producers[n]}' and '{o.name}'")
            producers[n] = o.name
        for n in o.inputs:
            consumers[n].add(o.name)
    for t in g.tensors:
        if t.kind not in KINDS:
            p.append(f"tensor '{t.name}' has kind {t.kind!r}; expected one of {KINDS}")
        if t.bytes <= 0:
            p.append(f"tensor '{t.name}' has {t.bytes} bytes; sizes must be positive")
        if t.producer != producers.get(t.name):
            p.append(f"tensor '{t.name}' says producer {t.producer!r} but ops say {producers.get(t.name)!r}")
        if (t.kind in ("input", "weight")) != (t.producer is None):
            p.append(f"tensor '{t.name}' of kind {t.kind} must {'not ' if t.kind in ('input', 'weight') else ''}"
                     f"have a producer")
        if set(t.consumers) != consumers.get(t.name, set()):
            p.append(f"tensor '{t.name}' lists consumers {sorted(t.consumers)} but ops say {sorted(consumers[t.name])}")
    return p


def validate(plan: Plan, stored_traffic: dict[str, int] | None = None) -> dict[str, int]:
    """Raise PlanValidationError unless every rule holds; return the traffic breakdown."""
    g, cap, order = plan.graph, plan.scratchpad_bytes, plan.order
    p = check_graph(g)
    if cap <= 0:
        p.append(f"scratchpad_bytes must be positive, got {cap}")
    elif cap > MAX_BYTES:  # what `memfit plan --scratchpad` refuses: not a 64-bit integer
        p.append(f"scratchpad_bytes {approx(cap)} is above {MAX_BYTES} (2^63 - 1, a 64-bit integer)")
    step = {name: i for i, name in enumerate(order)}
    if sorted(order) != sorted(g.op) or len(step) != len(order):
        p.append("'order' must list every op exactly once")
    if p:
        raise PlanValidationError(p)
    for i, name in enumerate(order):  # topological
        for n in g.op[name].inputs:
            prod = g.tensor[n].producer
            if prod is not None and step[prod] >= i:
                p.append(f"order is not topological: '{name}' (step {i}) reads '{n}' produced at step {step[prod]}")
    by_tensor: dict[str, list[Placement]] = defaultdict(list)
    for pl in plan.placements:
        t = g.tensor.get(pl.tensor)
        if t is None:
            p.append(f"placement of unknown tensor '{pl.tensor}'")
            continue
        if not (0 <= pl.start <= pl.end < len(order)):
            p.append(f"placement of '{pl.tensor}' has steps {pl.start}..{pl.end}; need 0 <= start <= end < {len(order)}")
            continue
        if pl.offset < 0 or pl.offset + t.bytes > cap:
            p.append(f"'{pl.tensor}' at offset {pl.offset} ({t.bytes} bytes) lies outside [0, {cap})")
        by_tensor[pl.tensor].append(pl)
    for name, pls in by_tensor.items():
        pls.sort(key=lambda x: x.start)
        for a, b in itertools.pairwise(pls):
            if b.start <= a.end:
                p.append(f"'{name}' has overlapping placements at steps {a.start}..{a.end} and {b.start}..{b.end}")
        t = g.tensor[name]
        if t.producer is not None and pls[0].start < step[t.producer]:
            p.append(f"'{name}' is placed at step {pls[0].start} before its producer '{t.producer}' "
                     f"runs (step {step[t.producer]})")
    for i, name in enumerate(order):  # residency
        for n in dict.fromkeys(g.op[name].inputs + g.op[name].outputs):
            if not any(pl.start <= i <= pl.end for pl in by_tensor.get(n, [])):
                p.append(f"'{n}' is not resident at step {i} where op '{name}' uses it")
    p.extend(_address_overlaps(plan, by_tensor))
    if p:
        raise PlanValidationError(p)
    traffic = compute_traffic(plan.graph, order, by_tensor)
    if stored_traffic is not None:
        bad = {k: v for k, v in stored_traffic.items() if k in traffic and traffic[k] != v}
        if bad:
            raise PlanValidationError([f"stored traffic {k}={v} but the placements imply {traffic[k]}"
                                       for k, v in bad.items()])
    return traffic


def _address_overlaps(plan: Plan, by_tensor: dict[str, list[Placement]]) -> list[str]:
    """Sweep over steps: placements resident at the same step must not share any byte."""
    size = {t.name: t.bytes for t in plan.graph.tensors}
    starts: dict[int, list[Placement]] = defaultdict(list)
    for pls in by_tensor.values():
        for pl in pls:
            starts[pl.start].append(pl)
    active: list[Placement] = []
    problems: list[str] = []
    for i in range(len(plan.order)):
        active = [a for a in active if a.end >= i] + starts.get(i, [])
        spans = sorted((a.offset, a.offset + size[a.tensor], a.tensor) for a in active)
        for (s0, e0, n0), (s1, e1, n1) in itertools.pairwise(spans):
            if s1 < e0:
                problems.append(f"step {i}: '{n0}' [{s0}, {e0}) overlaps '{n1}' [{s1}, {e1})")
        if len(problems) > 50:
            break
    return problems


def compute_traffic(g: Graph, order: list[str], by_tensor: dict[str, list[Placement]] | None = None) -> dict[str, int]:
    """Loads/stores in bytes implied by placements (assumes a structurally valid plan)."""
    if by_tensor is None:
        raise ValueError("pass placements grouped by tensor")
    loads = stores = reload = spill = 0
    for name, pls in by_tensor.items():
        t = g.tensor[name]
        pls = sorted(pls, key=lambda x: x.start)
        for k, pl in enumerate(pls):
            if not (t.producer is not None and order[pl.start] == t.producer):
                loads += t.bytes
                if t.producer is not None or k > 0:
                    reload += t.bytes
            later = k < len(pls) - 1
            if (t.kind in ("activation", "output") and later) or (t.kind == "output" and not later):
                stores += t.bytes
                spill += t.bytes if later else 0
    compulsory = sum(t.bytes for t in g.tensors if (t.kind in ("input", "weight") and t.consumers) or t.kind == "output")
    return {
        "load_bytes": loads,
        "store_bytes": stores,
        "total_bytes": loads + stores,
        "compulsory_bytes": compulsory,
        "non_compulsory_bytes": loads + stores - compulsory,
        "reload_bytes": reload,
        "spill_bytes": spill,
    }


def plan_traffic(plan: Plan) -> dict[str, int]:
    by_tensor: dict[str, list[Placement]] = defaultdict(list)
    for pl in plan.placements:
        by_tensor[pl.tensor].append(pl)
    return compute_traffic(plan.graph, plan.order, by_tensor)
