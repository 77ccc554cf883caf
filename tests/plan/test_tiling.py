"""Tiling oversized operators: every tile fits, no bytes lost, readers see the right pieces."""
import pytest

from memfit.plan.analysis import max_working_set, scratchpad_sizes
from memfit.plan.errors import InfeasibleScratchpadError
from memfit.plan.plan_format import OpSpec, TensorSpec, build_graph
from memfit.plan.planner import PlanOptions, make_plan
from memfit.plan.tiling import tile_graph
from memfit.plan.validate import check_graph, validate
from tests.plan.graphs import random_branching_dag


def test_unchanged_when_every_op_fits():
    g = random_branching_dag(20, 0)
    same, tiles = tile_graph(g, max_working_set(g)[1])
    assert same is g and tiles == {}


@pytest.mark.parametrize("seed", range(4))
def test_every_tile_fits_and_no_bytes_are_lost(seed):
    g = random_branching_dag(30, seed, weights=False)
    cap = max_working_set(g)[1] // 3
    tg, tiles = tile_graph(g, cap)
    assert check_graph(tg) == []
    assert tiles and all(k & (k - 1) == 0 and k >= 2 for k in tiles.values())
    assert max_working_set(tg)[1] <= cap
    for t in g.tensors:  # pieces cover the tensor (rounded up by less than one byte per piece)
        parts = [x.bytes for x in tg.tensors if x.name == t.name or x.name.startswith(t.name + "@")]
        assert t.bytes <= sum(parts) < t.bytes + len(parts)
    # untiled ops keep their name; tiled ones become k ops; together they read every piece they must
    assert len(tg.ops) == len(g.ops) + sum(k - 1 for k in tiles.values())
    for o in g.ops:
        k = tiles.get(o.name, 1)
        mine = [tg.op[o.name]] if k == 1 else [tg.op[f"{o.name}@{i}"] for i in range(k)]
        for n in o.inputs:
            got = [m for x in mine for m in x.inputs if m == n or m.startswith(n + "@")]
            assert sum(tg.tensor[m].bytes for m in got) >= g.tensor[n].bytes
    plan = make_plan(tg, cap, PlanOptions(planner="baseline-topo"))
    assert plan.traffic == validate(plan)


def test_weights_are_read_whole_by_every_tile():
    t = [TensorSpec("x", 64, "input"), TensorSpec("w", 16, "weight"), TensorSpec("y", 64, "output")]
    g = build_graph("one", t, [OpSpec("conv", ["x", "w"], ["y"])])
    tg, tiles = tile_graph(g, 60)  # 144 bytes: 4 tiles of 16 + 16 + 16 = 48
    assert tiles == {"conv": 4}
    assert [sorted(o.inputs) for o in tg.ops] == [["w", f"x@{i}"] for i in range(4)]
    assert all(tg.working_set(o) == 48 for o in tg.ops)
    with pytest.raises(InfeasibleScratchpadError, match="too small"):
        tile_graph(g, 16)  # the weight alone fills it: tiling cannot help
    assert scratchpad_sizes(tg).min_feasible == 48
