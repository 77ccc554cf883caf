"""The tile choice on held-out shapes: the tile ranker against the sequence model and LightGBM on the plain
kernel features, judged on measured latencies of every candidate (the tuned_matmul family of the dataset).

Every figure is over shapes the model did not train on: the fixed held-out split (dataset.shape_split, the
one the shipped models use) and, for more shapes, grouped k-fold over shapes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memfit.plan.cost import features, tiles
from memfit.plan.cost.dataset import split_shape_keys
from memfit.plan.cost.metrics import spearman
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.ranker import RankerConfig, TileRanker, relative_target
from memfit.plan.cost.tune import dataset_outcomes, summarise


@dataclass
class TileTable:
    """The labelled tuning kernels, one row each (IREE's default included, tile None)."""

    rows: list[dict]
    shape: np.ndarray        # (n,) shape key
    has_tile: np.ndarray     # (n,) bool
    X_tile: np.ndarray       # (n, len(tiles.NAMES)); zeros for the default
    X_plain: np.ndarray      # (n, len(features.NAMES))
    log_median: np.ndarray   # (n,) log of the label (the median CPU or real time: label_kind)
    log_min: np.ndarray      # (n,) log of the fastest repetition of the same clock (real where CPU
                             # repetitions were not stored)
    label_kind: str = "real_median"

    def __len__(self) -> int:
        return len(self.rows)


def complete(rows: list[dict], min_tiles: int = 16) -> list[dict]:
    """Rows of the shapes whose default and at least `min_tiles` candidates are labelled (an interrupted
    labelling run leaves its last shape partly done)."""
    tiles_of: dict[str, int] = {}
    default = set()
    for r in rows:
        if r["params"].get("tile"):
            tiles_of[r["shape_key"]] = tiles_of.get(r["shape_key"], 0) + 1
        else:
            default.add(r["shape_key"])
    return [r for r in rows if r["shape_key"] in default and tiles_of.get(r["shape_key"], 0) >= min_tiles]


def table(rows: list[dict], label_kind: str = "real_median", host: tiles.Host | None = None) -> TileTable:
    """Candidates' tile features against `host` (None: this CPU), plain features, and labels."""
    xt, xp, has = [], [], []
    for r in rows:
        fn = pick_function(r["mlir"])
        (m, n, k), tile = tiles.shape_and_tile(fn)
        has.append(tile is not None)
        xt.append(tiles.vector(m, n, k, tile, host) if tile else [0.0] * len(tiles.NAMES))
        xp.append(features.vector(fn))
    med = np.array([r["latency_us"] for r in rows], float)
    cpu = label_kind.startswith("cpu")
    mins = np.array([min(r["cpu_reps"]) if cpu and r.get("cpu_reps") else min(r["reps"]) if r.get("reps")
                     else r["latency_us"] for r in rows], float)
    return TileTable(rows, np.array([r["shape_key"] for r in rows]), np.array(has, bool),
                     np.array(xt, float).reshape(len(rows), len(tiles.NAMES)),
                     np.array(xp, float).reshape(len(rows), len(features.NAMES)), np.log(med), np.log(mins),
                     label_kind)


# A model is fitted on training rows and scores test rows (lower = faster); only the order within a shape
# matters, so absolute and relative predictions are compared alike.
Fitter = Callable[[TileTable, np.ndarray, np.ndarray], np.ndarray]


def ranker_fitter(cfg: RankerConfig = RankerConfig(), target: str = "median") -> Fitter:
    def fit(t: TileTable, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        tr = tr[t.has_tile[tr]]
        y = t.log_median if target == "median" else t.log_min
        model = TileRanker().fit(t.X_tile[tr], y[tr], t.shape[tr], cfg)
        return model.scores(t.X_tile[te])
    return fit


def shape_matrix(t: TileTable, idx: np.ndarray) -> np.ndarray:
    """tiles.shape_vector of each row of idx: (len(idx), len(tiles.SHAPE_NAMES))."""
    return np.array([tiles.shape_vector(*tiles.shape_and_tile(pick_function(t.rows[i]["mlir"]))[0]) for i in idx],
                    float).reshape(len(idx), len(tiles.SHAPE_NAMES))


def default_relative(t: TileTable, idx: np.ndarray, target: str = "median") -> tuple[np.ndarray, np.ndarray]:
    """The default rows among idx, and each one's log latency minus the mean over its shape's tiles in idx."""
    y = t.log_median if target == "median" else t.log_min
    rows, rel = [], []
    for i in idx[~t.has_tile[idx]]:
        j = idx[(t.shape[idx] == t.shape[i]) & t.has_tile[idx]]
        if len(j):
            rows.append(i)
            rel.append(y[i] - y[j].mean())
    return np.array(rows, dtype=np.int64), np.array(rel)


def fit_switch(t: TileTable, tr: np.ndarray, cfg: RankerConfig = RankerConfig(), target: str = "median") \
        -> TileRanker:
    """The ranker on the tile rows of tr, with the tile-or-default switch fitted on tr's shapes."""
    y = t.log_median if target == "median" else t.log_min
    tiles_tr = tr[t.has_tile[tr]]
    model = TileRanker().fit(t.X_tile[tiles_tr], y[tiles_tr], t.shape[tiles_tr], cfg)
    d, rel = default_relative(t, tr, target)
    return model.fit_default(shape_matrix(t, d), rel, cfg)


def switch_fitter(cfg: RankerConfig = RankerConfig(), target: str = "median") -> Fitter:
    """The ranker with the tile-or-default switch: tile rows get the ranker's score, default rows the switch's
    (score with `with_default=True`, so the default can be the pick)."""
    def fit(t: TileTable, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        model = fit_switch(t, tr, cfg, target)
        out = model.scores(t.X_tile[te])
        dflt = ~t.has_tile[te]
        if dflt.any():
            out[dflt] = model.default_scores(shape_matrix(t, te[dflt]))
        return out
    return fit


def lightgbm_plain_fitter(relative: bool = False, seed: int = 0) -> Fitter:
    """LightGBM on the kernel features the general model uses (features.NAMES, tile sizes included):
    absolute log latency (the Ansor-style baseline), or with `relative` the within-shape target."""
    def fit(t: TileTable, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        import lightgbm as lgb

        if relative:
            tr = tr[t.has_tile[tr]]
        y = relative_target(t.log_median[tr], t.shape[tr]) if relative else t.log_median[tr]
        params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 10,
                  "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
                  "seed": seed, "num_threads": 1, "verbose": -1, "deterministic": True, "force_row_wise": True}
        booster = lgb.train(params, lgb.Dataset(t.X_plain[tr], y), 400)
        return booster.predict(t.X_plain[te])
    return fit


def fixed_order_fitter() -> Fitter:
    """No model of the shape: every shape gets the tiles' mean relative log latency over the training shapes
    (always pick the tile that is best on average). What a learned ranker must beat."""
    def fit(t: TileTable, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        tr = tr[t.has_tile[tr]]
        rel = relative_target(t.log_median[tr], t.shape[tr])
        names = [_tile_name(t.rows[i]) for i in tr]
        mean = {n: float(np.mean([r for r, q in zip(rel, names) if q == n])) for n in set(names)}
        return np.array([mean.get(_tile_name(t.rows[i]), 0.0) for i in te])
    return fit


def _tile_name(row: dict) -> str:
    tile = row["params"].get("tile")
    return "default" if not tile else "tile_%dx%dx%d" % tuple(tile)


def score(t: TileTable, idx: np.ndarray, pred: np.ndarray, truth: str = "median", with_default: bool = False) -> dict:
    """In-the-loop figures of predictions `pred` (one per row of idx) on the shapes of idx: the pick's gap to
    the measured best, its speed-up over IREE's default, and the within-shape Spearman over the tiles.
    `with_default`: the default's prediction counts, and it may be the pick and the best."""
    true = np.exp(t.log_median if truth == "median" else t.log_min)
    rows = [{**t.rows[i], "latency_us": float(true[i])} for i in idx]
    outs = dataset_outcomes(rows, {t.rows[i]["key"]: float(p) for i, p in zip(idx, pred)}, with_default)
    rhos = []
    for s in np.unique(t.shape[idx]):
        j = [a for a, i in enumerate(idx) if t.shape[i] == s and t.has_tile[i]]
        if len(j) > 2:
            rhos.append(spearman(np.asarray(pred)[j], true[idx[j]]))
    return {**summarise(outs), "within_shape_spearman_mean": float(np.nanmean(rhos)) if rhos else None,
            "within_shape_spearman_median": float(np.nanmedian(rhos)) if rhos else None,
            "per_kernel": [o.as_dict() for o in outs]}


def held_out(t: TileTable, fit: Fitter, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train on the train+validation shapes of the fixed split, predict its test shapes."""
    tr, va, te = split_shape_keys(list(t.shape), seed)
    return te, fit(t, np.concatenate([tr, va]), te)


def cross_validated(t: TileTable, fit: Fitter, folds: int = 5, seed: int = 0,
                    subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grouped k-fold over the shapes of `subset` (default: all rows): every shape predicted by a model that
    did not see it. Returns (row indices, predictions)."""
    idx = np.arange(len(t)) if subset is None else np.asarray(subset)
    shapes = np.unique(t.shape[idx])
    np.random.default_rng(seed).shuffle(shapes)
    fold_of = {s: i % folds for i, s in enumerate(shapes)}
    f = np.array([fold_of[s] for s in t.shape[idx]])
    pred = np.empty(len(idx))
    for k in range(folds):
        te, tr = idx[f == k], idx[f != k]
        if len(te):
            pred[f == k] = fit(t, tr, te)
    return idx, pred


def spread_summary(t: TileTable, idx: np.ndarray) -> dict:
    """Per shape: compiled candidates and worst/best over them (the target needs >= 16 and >= 1.5x)."""
    spreads, counts = [], []
    for s in np.unique(t.shape[idx]):
        j = idx[(t.shape[idx] == s) & t.has_tile[idx]]
        counts.append(len(j))
        spreads.append(float(np.exp(t.log_median[j].max() - t.log_median[j].min())))
    return {"shapes": len(spreads), "candidates_min": min(counts), "spread_min": min(spreads),
            "spread_median": float(np.median(spreads)), "shapes_spread_ge_1_5": int(sum(s >= 1.5 for s in spreads))}


def load_table(db, label_kind: str | None = None, host: tiles.Host | None = None) -> TileTable:
    """The tuning candidates of `db`, labelled by `label_kind` read off their repetitions (default: the
    file's own kind)."""
    from pathlib import Path

    from memfit.plan.cost import store
    from memfit.plan.cost.errors import CostModelError
    from memfit.plan.cost.families import TUNED

    if not Path(db).exists():
        raise CostModelError(f"no dataset at {db}")
    con = store.connect(db)
    kind = label_kind or store.label_kind(con)
    rows = complete([r for r in store.labelled(con, kind) if r["family"] == TUNED])
    if len({r["shape_key"] for r in rows}) < 5:
        raise CostModelError(f"{db} has tuning candidates of fewer than 5 shapes labelled; add them "
                             "(python -m benchmarks.costmodel --add-tuned N --db DB) and label them")
    return table(rows, kind, host)


def train_ranker(db, out, cfg: RankerConfig = RankerConfig(), target: str = "median", seed: int = 0) -> dict:
    """Fit the ranker on the train+validation shapes of the fixed split, save it, and score it on the test
    shapes (which it has not seen)."""
    t = load_table(db)
    tr, va, te = split_shape_keys(list(t.shape), seed)
    fit = np.concatenate([tr, va])
    fit = fit[t.has_tile[fit]]
    y = t.log_median if target == "median" else t.log_min
    model = TileRanker().fit(t.X_tile[fit], y[fit], t.shape[fit], cfg)
    result = score(t, te, model.scores(t.X_tile[te]))
    result.pop("per_kernel")
    model.info.update(target=target, split_seed=seed, test=result)
    model.save(out)
    return {"ranker": str(out), "train_shapes": int(len(np.unique(t.shape[fit]))),
            "test_shapes": int(len(np.unique(t.shape[te]))), "test": result}
