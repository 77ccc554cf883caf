"""Ranking tile sizes: the candidates carry a lowering config, and the pick is judged on measured times."""
import pytest

from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.families import TILES
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.tune import candidates, dataset_outcomes, outcome, summarise

from .conftest import TINY_MATMUL


def test_candidates_set_the_tile_on_the_matmul():
    c = candidates(TINY_MATMUL)
    assert len(c) == len(TILES) + 1 and c["default"] == TINY_MATMUL
    assert "vector_common_parallel = [8, 32, 0], vector_reduction = [0, 0, 16]" in c["tile_8x32x16"]
    assert all(pick_function(m).name == "main" for m in c.values())
    with pytest.raises(CostModelError, match="linalg.matmul"):
        candidates(TINY_MATMUL.replace("linalg.matmul", "linalg.batch_matmul"))


def test_outcome_compares_the_pick_with_default_and_best():
    predicted = {"default": 5.0, "a": 1.0, "b": 2.0, "c": 3.0}
    measured = {"default": 20.0, "a": 11.0, "b": 10.0, "c": 30.0}
    o = outcome(predicted, measured)
    assert (o.pick, o.best) == ("a", "b")
    assert o.speedup_over_default == pytest.approx(20 / 11)
    assert o.gap_to_best == pytest.approx(0.1)
    assert o.spread == pytest.approx(3.0)
    assert summarise([o])["within_5pct_of_best"] == 0.0


def test_dataset_outcomes_skip_what_did_not_compile():
    rows = [{"key": f"k{i}", "shape_key": "s", "latency_us": t, "params": {"tile": tile}}
            for i, (tile, t) in enumerate([(None, 9.0), ([1, 16, 1], 5.0), ([8, 16, 1], 4.0)])]
    # the model would rank a candidate with no label (rejected by the compiler) first: it is not picked
    predicted = {"k0": 9.0, "k1": 3.0, "k2": 3.5}
    (o,) = dataset_outcomes(rows, predicted)
    assert o.pick == "tile_1x16x1" and o.best == "tile_8x16x1" and o.candidates == 2
