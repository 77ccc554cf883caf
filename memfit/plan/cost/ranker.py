"""The tile ranker: which vector tile of a matmul runs fastest, learned as a within-shape ranking problem.

The sequence model predicts absolute latency across every family; choosing a tile only needs the order of
one shape's candidates, whose latencies differ by a factor of a few while shapes differ by 1000x. The ranker
therefore learns each candidate's log latency relative to the mean over its shape's candidates (objective
"relative": L2 regression on that target) or the order itself (objective "lambdarank": LightGBM's listwise
loss, relevance graded in steps of 5% behind the shape's fastest candidate), from tile-aware features
(memfit.plan.cost.tiles). It is trained with LightGBM and stored as JSON trees scored with numpy."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memfit.plan.cost import tiles, trees
from memfit.plan.cost.errors import INSTALL_HINT, CostModelError

log = logging.getLogger(__name__)

FORMAT = "memfit-tile-ranker/1"
DEFAULT_RANKER = Path(__file__).resolve().parents[2] / "assets" / "costmodel" / "tile_ranker.json"


@dataclass
class RankerConfig:
    objective: str = "relative"   # "relative" (regression on log t - shape mean) or "lambdarank"
    n_estimators: int = 400
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 10
    feature_fraction: float = 0.8
    lambda_l2: float = 1.0
    cap: float | None = None      # "relative": a candidate more than cap x its shape's best counts as cap x
                                  # (the order among the slow ones does not choose a tile; L2 on them would)
    step: float = 0.05            # lambdarank relevance: one grade per 5% behind the shape's best
    grades: int = 16
    features: tuple[str, ...] | None = None  # a subset of tiles.NAMES (None: all)
    seed: int = 0


# the shape, the tile and how the tile covers the shape: a compact set for few training shapes
COMPACT = ("log_m", "log_n", "log_k", "log_tm", "log_tn", "log_tk", "pad_m", "pad_n", "pad_k", "divides_m",
           "divides_n", "divides_k", "rem64_m", "rem64_n")
# smaller, slower-learning trees; with COMPACT, the variant the benchmark chose by cross-validation on the
# training shapes and the one shipped (benchmarks/costmodel_loop.py)
SMALL = {"n_estimators": 300, "learning_rate": 0.02, "num_leaves": 7, "min_data_in_leaf": 20,
         "feature_fraction": 0.5}


def relative_target(log_t: np.ndarray, groups: np.ndarray, cap: float | None = None) -> np.ndarray:
    """log latency minus the mean log latency of the same group (shape): what the ranker predicts. With
    `cap`, latencies are first clipped at cap x the group's fastest."""
    out = np.empty(len(log_t))
    for g in np.unique(groups):
        i = groups == g
        x = log_t[i] if cap is None else np.minimum(log_t[i], log_t[i].min() + np.log(cap))
        out[i] = x - x.mean()
    return out


def relevance(log_t: np.ndarray, groups: np.ndarray, step: float = 0.05, grades: int = 16) -> np.ndarray:
    """Integer grades for lambdarank: grades-1 for a candidate within `step` of its shape's best, one less
    per further `step` (multiplicative), 0 beyond."""
    out = np.empty(len(log_t), dtype=np.int64)
    for g in np.unique(groups):
        i = groups == g
        behind = (log_t[i] - log_t[i].min()) / math.log1p(step)
        out[i] = np.clip(grades - 1 - np.floor(behind), 0, grades - 1).astype(np.int64)
    return out


def _contiguous(groups: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """An order that puts each group's rows together, and the group sizes (LightGBM's query groups)."""
    order = np.argsort(groups, kind="stable")
    _, sizes = np.unique(groups[order], return_counts=True)
    return order, sizes.tolist()


@dataclass
class TileRanker:
    trees: list = field(default_factory=list)
    objective: str = "relative"
    feature_names: tuple[str, ...] = tiles.NAMES
    info: dict = field(default_factory=dict)
    # the tile-or-default switch: IREE's default's log latency relative to the mean over its shape's tiles,
    # predicted from the shape alone (tiles.SHAPE_NAMES); empty: the ranker always picks a tile
    default_trees: list = field(default_factory=list)
    host: tiles.Host | None = None  # the CPU its features describe (set by fit and load; None: this CPU)

    def fit(self, X: np.ndarray, log_t: np.ndarray, groups: np.ndarray, cfg: RankerConfig = RankerConfig(),
            host: tiles.Host | None = None) -> "TileRanker":
        """X: (n, len(tiles.NAMES)) candidate features; log_t: (n,) measured log latency; groups: (n,) shape
        ids (a candidate is only compared with candidates of its own shape); `host`: the CPU X describes
        (None: this one)."""
        self.feature_names = tuple(cfg.features or tiles.NAMES)
        self.host = host or tiles.this_host()
        try:
            import lightgbm as lgb
        except ImportError as exc:
            raise CostModelError(f"training the tile ranker needs lightgbm: {INSTALL_HINT}") from exc
        params = {"learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves,
                  "min_data_in_leaf": cfg.min_data_in_leaf, "feature_fraction": cfg.feature_fraction,
                  "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": cfg.lambda_l2, "seed": cfg.seed,
                  "num_threads": 1, "verbose": -1, "deterministic": True, "force_row_wise": True}
        X, log_t, groups = self._columns(X), np.asarray(log_t, float), np.asarray(groups)
        if cfg.objective == "relative":
            data = lgb.Dataset(X, relative_target(log_t, groups, cfg.cap))
            params.update(objective="regression")
        elif cfg.objective == "lambdarank":
            order, sizes = _contiguous(groups)
            rel = relevance(log_t, groups, cfg.step, cfg.grades)
            data = lgb.Dataset(X[order], rel[order], group=sizes)
            params.update(objective="lambdarank", label_gain=[float(2 ** g - 1) for g in range(cfg.grades)],
                          lambdarank_truncation_level=max(sizes))
        else:
            raise ValueError(f"unknown ranker objective {cfg.objective!r}")
        booster = lgb.train(params, data, cfg.n_estimators)
        self.trees, self.objective = trees.from_lightgbm(booster), cfg.objective
        self.info = {"config": asdict(cfg), "train_rows": int(len(X)), "train_groups": int(len(np.unique(groups)))}
        return self

    def fit_default(self, X_shape: np.ndarray, rel_default: np.ndarray, cfg: RankerConfig = RankerConfig()) \
            -> "TileRanker":
        """X_shape: (shapes, len(tiles.SHAPE_NAMES)); rel_default: (shapes,) log latency of IREE's default
        minus the mean log latency of the shape's tiles (the scale of the "relative" scores)."""
        if self.objective != "relative":
            raise ValueError("the tile-or-default switch compares with relative scores (objective 'relative')")
        import lightgbm as lgb

        params = {"objective": "regression", "learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves,
                  "min_data_in_leaf": min(cfg.min_data_in_leaf, max(2, len(X_shape) // 4)),
                  "feature_fraction": cfg.feature_fraction, "bagging_fraction": 0.8, "bagging_freq": 1,
                  "lambda_l2": cfg.lambda_l2, "seed": cfg.seed, "num_threads": 1, "verbose": -1,
                  "deterministic": True, "force_row_wise": True}
        booster = lgb.train(params, lgb.Dataset(np.asarray(X_shape, float), np.asarray(rel_default, float)),
                            cfg.n_estimators)
        self.default_trees = trees.from_lightgbm(booster)
        self.info["default_train_shapes"] = int(len(X_shape))
        return self

    def default_scores(self, X_shape: np.ndarray) -> np.ndarray | None:
        """IREE's default's score on the scale of `scores` (None without the switch)."""
        if not self.default_trees:
            return None
        return trees.predict(self.default_trees, np.asarray(X_shape, float).reshape(-1, len(tiles.SHAPE_NAMES)))

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Lower is faster. "relative": the predicted log latency relative to the shape's candidate mean."""
        raw = trees.predict(self.trees, self._columns(X))
        return raw if self.objective == "relative" else -raw  # lambdarank scores higher = more relevant

    def _columns(self, X: np.ndarray) -> np.ndarray:
        """The model's features out of full tiles.NAMES rows."""
        X = np.asarray(X, float)
        if X.shape[1] != len(tiles.NAMES):
            raise ValueError(f"expected {len(tiles.NAMES)} tile features per row, got {X.shape[1]}")
        return X[:, [tiles.NAMES.index(n) for n in self.feature_names]]

    def save(self, path: str | Path) -> None:
        doc = {"format": FORMAT, "objective": self.objective, "features": list(self.feature_names),
               "host": tiles.host_info(self.host), "info": self.info, "trees": [t.to_json() for t in self.trees],
               "default_features": list(tiles.SHAPE_NAMES),
               "default_trees": [t.to_json() for t in self.default_trees]}
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> "TileRanker":
        try:
            doc = json.loads(Path(path).read_text())
        except ValueError as exc:  # not JSON, or not UTF-8 text (UnicodeDecodeError is a ValueError)
            raise CostModelError(f"{path} is not a tile ranker ({FORMAT}): {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CostModelError(f"{path} is not a tile ranker ({FORMAT})")
        if not set(doc["features"]) <= set(tiles.NAMES):
            raise CostModelError(f"{path} was trained on other tile features; retrain it "
                                 "(memfit costmodel train-ranker)")
        if doc.get("default_trees") and doc.get("default_features") != list(tiles.SHAPE_NAMES):
            raise CostModelError(f"{path}'s tile-or-default switch was trained on other shape features; retrain "
                                 "it (memfit costmodel train-ranker)")
        host = tiles.Host(**doc["host"]) if doc.get("host") else tiles.Host()  # unrecorded: the AVX-512 Xeon
        if host != tiles.this_host():
            # Its trees learned what tiles cost on that CPU: candidates are described against that CPU (what
            # the trees understand), but the picks are that CPU's, not this one's.
            log.warning("tile ranker %s was trained on another CPU (%s); this CPU is %s: its picks describe that "
                        "CPU; retrain it here (memfit costmodel train-ranker)", path, tiles.host_info(host),
                        tiles.host_info(tiles.this_host()))
        return cls([trees.Tree.from_json(t) for t in doc["trees"]], doc["objective"], tuple(doc["features"]),
                   doc.get("info", {}), [trees.Tree.from_json(t) for t in doc.get("default_trees", [])], host)


def candidate_matrix(fns: list, host: tiles.Host | None = None) -> tuple[np.ndarray, list[bool]]:
    """Tile features of parsed candidate functions against `host` (a ranker's; None: this CPU); rows of
    candidates without a tile (IREE's default) are zeros and flagged False (the ranker does not score them)."""
    rows, has = [], []
    for fn in fns:
        (m, n, k), tile = tiles.shape_and_tile(fn)
        has.append(tile is not None)
        rows.append(tiles.vector(m, n, k, tile, host) if tile else [0.0] * len(tiles.NAMES))
    return np.array(rows, dtype=np.float64).reshape(len(fns), len(tiles.NAMES)), has
