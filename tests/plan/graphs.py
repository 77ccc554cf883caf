"""Small synthetic graphs for planner tests (seeded, no torch)."""
from __future__ import annotations

import random

from memfit.plan.plan_format import Graph, OpSpec, TensorSpec, build_graph


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
