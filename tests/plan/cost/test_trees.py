"""The numpy tree evaluator scores exactly what LightGBM scores, for both ranker objectives."""
import json

import numpy as np
import pytest

from memfit.plan.cost import trees


def test_hand_built_tree():
    # x0 <= 1 -> (x1 <= 0 -> 10 else 20) else 30
    t = trees.Tree(np.array([0, 1]), np.array([1.0, 0.0]), np.array([1, ~0]), np.array([~2, ~1]),
                   np.array([10.0, 20.0, 30.0]))
    X = np.array([[0.0, -1.0], [0.5, 2.0], [3.0, 0.0], [1.0, 0.0]])
    assert t.predict(X).tolist() == [10.0, 20.0, 30.0, 10.0]
    assert trees.Tree.from_json(json.loads(json.dumps(t.to_json()))).predict(X).tolist() == [10.0, 20.0, 30.0, 10.0]


@pytest.mark.parametrize("objective", ["regression", "lambdarank"])
def test_matches_lightgbm(objective):
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 6))
    X[:, 5] = rng.integers(0, 3, 240)  # a few repeated values: thresholds on ties
    if objective == "regression":
        y, kw = X[:, 0] * 2 + np.sin(X[:, 1]) + (X[:, 5] > 1), {}
    else:
        y, kw = rng.integers(0, 4, 240), {"group": [12] * 20}
    b = lgb.train({"objective": objective, "verbose": -1, "num_threads": 1, "min_data_in_leaf": 3},
                  lgb.Dataset(X, y, **kw), 30)
    Xt = np.vstack([rng.normal(size=(50, 6)), X[:20]])
    got = trees.predict(trees.from_lightgbm(b), Xt)
    np.testing.assert_allclose(got, b.predict(Xt), rtol=0, atol=1e-12)
