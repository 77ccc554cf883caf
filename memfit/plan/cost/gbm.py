"""The gradient-boosting baseline: LightGBM on the hand-built features, one regressor per figure, on the log
scale, with early stopping on the validation split (the Ansor/TVM recipe on kernel-level features)."""
from __future__ import annotations

import numpy as np

from memfit.plan.cost.dataset import TARGETS, Examples, from_log, to_log
from memfit.plan.cost.errors import INSTALL_HINT, CostModelError


def _lgb():
    try:
        import lightgbm
    except ImportError as exc:
        raise CostModelError(f"the LightGBM baseline needs lightgbm: {INSTALL_HINT}") from exc
    return lightgbm


class GBM:
    def __init__(self, seed: int = 0, n_estimators: int = 3000, learning_rate: float = 0.03) -> None:
        self.seed, self.n_estimators, self.learning_rate = seed, n_estimators, learning_rate
        self.models: list = []

    def fit(self, train: Examples, val: Examples) -> "GBM":
        lgb = _lgb()
        Zt, Zv = to_log(train.Y), to_log(val.Y)
        self.models = []
        params = {"objective": "regression", "metric": "l1", "learning_rate": self.learning_rate,
                  "num_leaves": 31, "min_data_in_leaf": 5, "bagging_fraction": 0.8, "bagging_freq": 1,
                  "feature_fraction": 0.8, "lambda_l2": 1.0, "seed": self.seed, "num_threads": 1, "verbose": -1}
        for j in range(len(TARGETS)):
            dtrain = lgb.Dataset(train.X, Zt[:, j])
            dval = lgb.Dataset(val.X, Zv[:, j], reference=dtrain)
            self.models.append(lgb.train(params, dtrain, self.n_estimators, valid_sets=[dval],
                                         callbacks=[lgb.early_stopping(100, verbose=False)]))
        return self

    def predict(self, ex: Examples) -> np.ndarray:
        Z = np.stack([m.predict(ex.X, num_iteration=m.best_iteration) for m in self.models], axis=1)
        return from_log(Z)
