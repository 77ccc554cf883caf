"""The tile ranker on tiny synthetic data: its targets, that it learns a within-shape order from the tile
features and picks well on shapes it did not see, and that it survives a save/load (JSON, no pickle)."""
import math

import numpy as np
import pytest

from memfit.plan.cost import store, tiles
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.families import TILES, generate_tuned
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.ranker import COMPACT, RankerConfig, TileRanker, candidate_matrix, relative_target, relevance
from memfit.plan.cost.tune import candidates

from .conftest import TINY_MATMUL

GOOD = [t for t in TILES if t != (16, 32, 16)]  # the one IREE rejects


def synthetic_latency(m: int, n: int, k: int, tile) -> float:
    """A made-up cost with the effects the features describe: padded work, register overflow (spills) and
    the FMA-per-load reuse of the register tile."""
    f = tiles.features(m, n, k, tile)
    return m * n * k * (1 + f["pad_work"]) * (1 + 0.08 * f["regs_over"]) * (1 + 4 / f["reuse"]) * 1e-3


def synthetic(n_shapes: int, seed: int):
    rng = np.random.default_rng(seed)
    X, y, g, shapes = [], [], [], []
    for s in range(n_shapes):
        m, n, k = (int(v) for v in np.exp(rng.uniform(math.log(16), math.log(700), 3)))
        shapes.append((m, n, k))
        for t in GOOD:
            X.append(tiles.vector(m, n, k, t))
            y.append(math.log(synthetic_latency(m, n, k, t)))
            g.append(s)
    return np.array(X), np.array(y), np.array(g), shapes


def test_targets_are_within_shape():
    log_t = np.log(np.array([100.0, 104.0, 120.0, 1000.0, 3000.0]))
    groups = np.array([0, 0, 0, 1, 1])
    rel = relative_target(log_t, groups)
    assert rel[:3].sum() == pytest.approx(0) and rel[3:].sum() == pytest.approx(0)
    assert rel[4] - rel[3] == pytest.approx(math.log(3))
    # capped at 2x the best: 3000 counts as 2000 (so 1000 -> -log(2)/2, 2000 -> +log(2)/2)
    capped = relative_target(log_t, groups, cap=2.0)
    assert capped[3:].tolist() == pytest.approx([-math.log(2) / 2, math.log(2) / 2])
    assert capped[:3].tolist() == pytest.approx(rel[:3].tolist())  # 120 < 2 x 100: unchanged
    # within 5% of the best: top grade; each further 5% costs one grade; beyond 15 steps: 0
    assert relevance(log_t, groups, 0.05, 16).tolist() == [15, 15, 12, 15, 0]


@pytest.mark.parametrize("objective", ["relative", "lambdarank"])
def test_learns_the_order_on_unseen_shapes(objective):
    pytest.importorskip("lightgbm")
    X, y, g, _ = synthetic(60, seed=0)
    r = TileRanker().fit(X, y, g, RankerConfig(objective=objective, n_estimators=200))
    Xt, yt, gt, _ = synthetic(20, seed=1)
    s = r.scores(Xt)
    hits = 0
    for shape in np.unique(gt):
        i = gt == shape
        pick = np.argmin(s[i])
        hits += np.exp(yt[i][pick] - yt[i].min()) <= 1.05
    assert hits >= 16  # of 20 shapes the ranker never saw
    # shuffling the candidates' features within each shape must break it (the test can fail)
    rng = np.random.default_rng(2)
    Xs = Xt.copy()
    for shape in np.unique(gt):
        i = np.flatnonzero(gt == shape)
        Xs[i] = Xt[rng.permutation(i)]
    s2 = r.scores(Xs)
    assert sum(np.exp(yt[gt == q][np.argmin(s2[gt == q])] - yt[gt == q].min()) <= 1.05 for q in np.unique(gt)) < hits


def test_save_load_round_trip(tmp_path):
    pytest.importorskip("lightgbm")
    X, y, g, _ = synthetic(10, seed=3)
    r = TileRanker().fit(X, y, g, RankerConfig(n_estimators=20))
    path = tmp_path / "ranker.json"
    r.save(path)
    assert b"\x80" not in path.read_bytes()[:2]  # JSON text, not a pickle
    back = TileRanker.load(path)
    np.testing.assert_array_equal(back.scores(X), r.scores(X))
    # a ranker on a subset of the features reads its columns out of the full rows, before and after saving
    sub = TileRanker().fit(X, y, g, RankerConfig(n_estimators=20, features=COMPACT))
    sub.save(tmp_path / "sub.json")
    assert TileRanker.load(tmp_path / "sub.json").feature_names == COMPACT
    np.testing.assert_array_equal(TileRanker.load(tmp_path / "sub.json").scores(X), sub.scores(X))
    X2 = X.copy()
    X2[:, [i for i, n in enumerate(tiles.NAMES) if n not in COMPACT]] = 1e9  # columns it must not read
    np.testing.assert_array_equal(sub.scores(X2), sub.scores(X))
    path.write_text('{"format": "something else"}')
    with pytest.raises(CostModelError, match="not a tile ranker"):
        TileRanker.load(path)


def test_train_ranker_from_a_dataset(tmp_path):
    """The command's path on a dataset whose tuning candidates carry synthetic labels (no IREE)."""
    pytest.importorskip("lightgbm")
    from memfit.plan.cost.rank_eval import train_ranker

    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = generate_tuned(12, seed=5)
    store.add_kernels(con, specs)
    for s in specs:
        p = s.params
        if p["tile"] is None:
            t = synthetic_latency(p["M"], p["N"], p["K"], (8, 32, 16)) * 1.3
        elif tuple(p["tile"]) == (16, 32, 16):
            store.put_label(con, s.key(), error="rejected")
            continue
        else:
            t = synthetic_latency(p["M"], p["N"], p["K"], tuple(p["tile"]))
        store.put_label(con, s.key(), latency_us=t, reps=[t * 1.02, t, t * 1.01], spread=0.02)
    out = train_ranker(db, tmp_path / "r.json", RankerConfig(n_estimators=50))
    assert out["test_shapes"] + out["train_shapes"] == 12
    back = TileRanker.load(tmp_path / "r.json")
    assert back.info["test"]["kernels"] == out["test_shapes"] and back.info["train_groups"] == out["train_shapes"]


def _default_latency(m: int, n: int, k: int) -> float:
    """A made-up IREE default: half the best tile's time on small M, twice the best tile's otherwise."""
    best = min(synthetic_latency(m, n, k, t) for t in GOOD)
    return best * (0.5 if m < 100 else 2.0)


def test_switch_learns_when_the_default_wins_and_survives_save_load(tmp_path):
    pytest.importorskip("lightgbm")
    X, y, g, shapes = synthetic(80, seed=4)
    r = TileRanker().fit(X, y, g, RankerConfig(n_estimators=100))
    assert r.default_scores(np.zeros((1, len(tiles.SHAPE_NAMES)))) is None  # no switch: always a tile
    S = np.array([tiles.shape_vector(*s) for s in shapes])
    rel = np.array([math.log(_default_latency(*s)) - y[g == i].mean() for i, s in enumerate(shapes)])
    r.fit_default(S, rel, RankerConfig(n_estimators=200))
    Xt, yt, gt, test_shapes = synthetic(30, seed=5)
    St = np.array([tiles.shape_vector(*s) for s in test_shapes])

    def right_calls(model, S_):
        """Shapes where the switch's call (IREE's default, or the ranker's best tile) is the faster one."""
        d, s = model.default_scores(S_), model.scores(Xt)
        ok = 0
        for i, shape in enumerate(test_shapes):
            j = gt == i
            takes_default = d[i] < s[j].min()
            ok += takes_default == (_default_latency(*shape) < np.exp(yt[j]).min())
        return ok

    good = right_calls(r, St)
    assert good >= 28  # of 30 shapes it never saw
    # the switch reads the shape: shuffled across shapes, it must call worse (the test can fail)
    assert right_calls(r, St[np.random.default_rng(0).permutation(len(St))]) < good - 3
    path = tmp_path / "r.json"
    r.save(path)
    back = TileRanker.load(path)
    np.testing.assert_array_equal(back.default_scores(St), r.default_scores(St))
    np.testing.assert_array_equal(back.scores(Xt), r.scores(Xt))


def test_a_ranker_records_its_cpu_and_warns_on_another(tmp_path, caplog):
    """The tile features describe one CPU (registers, lanes, caches): a ranker keeps the one it was trained
    on, and one trained on another CPU is loaded with that CPU's features and a warning."""
    import json
    import logging

    pytest.importorskip("lightgbm")
    X, y, g, _ = synthetic(8, seed=5)
    r = TileRanker().fit(X, y, g, RankerConfig(n_estimators=10))
    assert r.host == tiles.this_host()
    path = tmp_path / "ranker.json"
    r.save(path)
    with caplog.at_level(logging.WARNING, logger="memfit.plan.cost.ranker"):
        assert TileRanker.load(path).host == tiles.this_host()
    assert not caplog.records
    other = tiles.Host(64, 32, 1 << 20, 8 << 20) if tiles.this_host() != tiles.Host(64, 32, 1 << 20, 8 << 20) \
        else tiles.Host()
    doc = json.loads(path.read_text())
    doc["host"] = tiles.host_info(other)
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="memfit.plan.cost.ranker"):
        back = TileRanker.load(path)
    assert back.host == other and "another CPU" in caplog.text
    doc.pop("host")  # written before hosts were recorded: the AVX-512 Xeon's
    path.write_text(json.dumps(doc))
    assert TileRanker.load(path).host == tiles.Host()
    # the candidates of a shape are described against the ranker's CPU
    fn = pick_function(candidates(TINY_MATMUL)["tile_8x32x16"])
    np.testing.assert_array_equal(candidate_matrix([fn], other)[0][0], tiles.vector(16, 16, 32, (8, 32, 16), other))
    assert not np.array_equal(candidate_matrix([fn], other)[0], candidate_matrix([fn])[0])
