"""Small synthetic graphs for planner tests (seeded, no torch)."""
from __future__ import annotations

import random

from memfit.plan.plan_format import Graph, OpSpec, Placement, TensorSpec, build_graph


def random_dag(n_ops: int, seed: int, weights: bool = True) -> Graph:
    """A random DAG: each op reads the previous result, sometimes an older one (skip edge) and a weight."""
    rnd = random.Random(seed)
    tensors = [TensorSpec("x", rnd.choice([32, 64]), "input")]
    ops, made = [], ["x"]
    for i in range(n_ops):
        ins = [made[-1]]
        if len(made) > 2 and rnd.random() < 0.35:
            ins.append(rnd.choice(made[:-1]))
        if weights and rnd.random() < 0.7:
            tensors.append(TensorSpec(f"w{i}", rnd.choice([16, 32, 48]), "weight"))
            ins.append(f"w{i}")
        out = f"a{i}"
        tensors.append(TensorSpec(out, rnd.choice([32, 64, 96, 128]), "activation"))
        ops.append(OpSpec(f"op{i}", list(dict.fromkeys(ins)), [out]))
        made.append(out)
    tensors[-1].kind = "output"
    return build_graph(f"dag{seed}", tensors, ops)


def order_matters() -> Graph:
    """The framework order (b, a, c, d) must spill Y; the order (a, c, b, d) needs no spill at 21 bytes."""
    t = [TensorSpec("x", 1, "input"), TensorSpec("X", 10, "activation"), TensorSpec("X2", 10, "activation"),
         TensorSpec("Y", 8, "activation"), TensorSpec("out", 1, "output")]
    ops = [OpSpec("b", ["x"], ["Y"]), OpSpec("a", ["x"], ["X"]), OpSpec("c", ["X"], ["X2"]),
           OpSpec("d", ["Y", "X2"], ["out"])]
    return build_graph("order_matters", t, ops)


def random_branching_dag(n_ops: int, seed: int, sizes: tuple[int, ...] = (32, 64, 96, 128),
                         weights: bool = True) -> Graph:
    """A cell-like random DAG (NAS cells, RandWire): each op reads one to three earlier results, mostly
    recent ones, so branches run side by side and the order is far from fixed; one op joins every result
    nobody reads into the output."""
    rnd = random.Random(seed)
    tensors = [TensorSpec("x", rnd.choice(sizes), "input")]
    ops, made = [], ["x"]
    for i in range(n_ops - 1):
        k = min(len(made), rnd.choice([1, 1, 2, 2, 3]))
        recent = made[-6:]
        ins = list(dict.fromkeys(rnd.choice(recent if rnd.random() < 0.8 else made) for _ in range(k)))
        if weights and rnd.random() < 0.5:
            tensors.append(TensorSpec(f"w{i}", rnd.choice(sizes) // 2 or 1, "weight"))
            ins.append(f"w{i}")
        tensors.append(TensorSpec(f"a{i}", rnd.choice(sizes), "activation"))
        ops.append(OpSpec(f"op{i}", ins, [f"a{i}"]))
        made.append(f"a{i}")
    read = {n for o in ops for n in o.inputs}
    tails = [n for n in made if n not in read] or [made[-1]]
    tensors.append(TensorSpec("out", rnd.choice(sizes), "output"))
    ops.append(OpSpec("join", tails, ["out"]))
    return build_graph(f"branching{seed}", tensors, ops)


def per_step_plan(g: Graph) -> tuple[list[str], list[Placement]]:
    """The old whole-graph fallback, built independently of memfit: the framework order, each op's tensors
    resident for its own step only, packed from offset 0."""
    order, placements = g.topo_order(), []
    for t, name in enumerate(order):
        off = 0
        for n in dict.fromkeys(g.op[name].inputs + g.op[name].outputs):
            placements.append(Placement(n, off, t, t))
            off += g.tensor[n].bytes
    return order, placements


def optimum_over_all_orders(g: Graph, cap: int) -> int:
    """The exact per-step model's optimum with the order free (CP-SAT, 30 s, 1 worker): what no bound may exceed."""
    from memfit.plan.exact import ExactConfig, Segment, solve_segment
    from memfit.plan.planner import best_seed
    opt = solve_segment(g, cap, Segment(best_seed(g, cap).order, free_order=True), ExactConfig(30, 1))
    assert opt.status == "optimal"
    return opt.objective_bytes
