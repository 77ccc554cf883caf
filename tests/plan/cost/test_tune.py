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


def _hand_ranker(path):
    """A one-tree ranker: tm <= 8 scores 0; else tn <= 16 scores -1; else tk <= 1 scores -2, else -0.5.
    Its pick among the candidates is therefore 16x32x1."""
    import numpy as np

    from memfit.plan.cost import tiles
    from memfit.plan.cost.ranker import TileRanker
    from memfit.plan.cost.trees import Tree

    f = [tiles.NAMES.index(n) for n in ("tm", "tn", "tk")]
    tree = Tree(np.array(f), np.array([8.0, 16.0, 1.0]), np.array([~0, ~1, ~2]), np.array([1, 2, ~3]),
                np.array([0.0, -1.0, -2.0, -0.5]))
    TileRanker([tree], "relative").save(path)
    return path


def test_tune_chooses_by_the_ranker(tmp_path):
    import math

    from memfit.plan.cost.predict import predict_many
    from memfit.plan.cost.tune import tune

    path = _hand_ranker(tmp_path / "ranker.json")
    out = tune(TINY_MATMUL, ranker=str(path))
    assert out["pick"] == "tile_16x32x1" and out["ranked_by"].startswith("tile ranker")
    assert "vector_common_parallel = [16, 32, 0], vector_reduction = [0, 0, 1]" in out["pick_program"]
    # predicted_us: the sequence model's level (geometric mean over the tiles) times the ranker's factor
    preds = [r["predicted_us"] for r in out["ranking"]]
    assert preds == sorted(preds)
    seq = dict(zip(candidates(TINY_MATMUL), predict_many(list(candidates(TINY_MATMUL).values()))))
    level = sum(math.log(v["latency_us"]) for k, v in seq.items() if k != "default") / len(TILES)
    assert out["ranking"][0]["predicted_us"] == pytest.approx(math.exp(level - 2.0))
    # without the ranker, the sequence model's own order decides
    plain = tune(TINY_MATMUL, use_ranker=False)
    assert plain["ranked_by"] == "sequence model"
    assert plain["pick"] == min((k for k in seq if k != "default"), key=lambda k: seq[k]["latency_us"])
    with pytest.raises(CostModelError, match="no tile ranker"):
        tune(TINY_MATMUL, ranker=str(tmp_path / "missing.json"))


def test_outcome_with_the_default_as_a_candidate():
    predicted = {"default": 0.5, "a": 1.0, "b": 2.0}
    measured = {"default": 9.0, "a": 11.0, "b": 10.0}
    o = outcome(predicted, measured, with_default=True)
    assert (o.pick, o.best) == ("default", "default") and o.speedup_over_default == 1.0 and o.gap_to_best == 0
    # without the switch the default is only the reference: the pick and the best are tiles
    o = outcome(predicted, measured)
    assert (o.pick, o.best) == ("a", "b")


def test_tune_takes_the_default_when_the_switch_says_so(tmp_path):
    import numpy as np

    from memfit.plan.cost.ranker import TileRanker
    from memfit.plan.cost.trees import Tree
    from memfit.plan.cost.tune import tune

    r = TileRanker.load(_hand_ranker(tmp_path / "ranker.json"))
    # one leaf: the default scores `v` on the tiles' scale, where the best tile (16x32x1) scores -2
    for v, pick in ((-3.0, "default"), (-1.0, "tile_16x32x1")):
        r.default_trees = [Tree(np.array([], int), np.array([]), np.array([], int), np.array([], int),
                                np.array([v]))]
        r.save(tmp_path / "switch.json")
        out = tune(TINY_MATMUL, ranker=str(tmp_path / "switch.json"))
        assert out["pick"] == pick and "tile-or-default switch" in out["ranked_by"]
        assert out["pick_program"] == candidates(TINY_MATMUL)[pick]
