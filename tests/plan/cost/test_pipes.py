"""The roofline with a pipe per kind of work (roofline.PipeBase): its feature columns, its fit, and how a model
file stores it (a base of an unknown kind is refused at load)."""
import math
from dataclasses import asdict

import numpy as np
import pytest

from memfit.plan.cost import features
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.roofline import LogBase, PipeBase, base_of, fit_log_base, fit_pipe_base
from tests.plan.cost.conftest import TINY_MATMUL

CHAIN = """func.func @main(%x: tensor<8x4xf32>, %y: tensor<8x4xf32>) -> tensor<8x4xf32> {
  %e = tensor.empty() : tensor<8x4xf32>
  %t = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>,
      affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]}
      ins(%x, %y : tensor<8x4xf32>, tensor<8x4xf32>) outs(%e : tensor<8x4xf32>) {
  ^bb0(%a: f32, %b: f32, %o: f32):
    %s = arith.addf %a, %b : f32
    %m = arith.mulf %s, %s : f32
    %r = math.exp %m : f32
    linalg.yield %r : f32
  } -> tensor<8x4xf32>
  %c = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>],
      iterator_types = ["parallel", "parallel"]} ins(%t : tensor<8x4xf32>) outs(%e : tensor<8x4xf32>) {
  ^bb0(%a: f32, %o: f32):
    linalg.yield %a : f32
  } -> tensor<8x4xf32>
  return %c : tensor<8x4xf32>
}
"""

TRUE = PipeBase({"f32": 8e10, "bf16": 3e10, "i8": 5e10}, arith_per_s=2e10, trans_per_s=2e9, convert_per_s=1e10,
                bytes_per_s=2e10, overhead_us=3.0)


def test_pipe_columns_of_a_matmul_and_a_chain():
    mm = features.pipes(pick_function(TINY_MATMUL))             # 16x32 @ 32x16 and its zero fill
    assert mm["log_contract_flops"] == pytest.approx(math.log2(2 * 16 * 16 * 32 + 1))
    assert mm["log_arith_elems"] == 0.0                         # the fill counts nothing
    ch = features.pipes(pick_function(CHAIN))
    assert ch["log_contract_flops"] == 0.0
    # 32 iterations x (addf, mulf), then a copy at one op an iteration; the exp is a transcendental, not here
    assert ch["log_arith_elems"] == pytest.approx(math.log2(32 * 2 + 32 + 1))
    x = features.full_vector(pick_function(CHAIN))
    assert len(x) == len(features.ALL_NAMES)
    assert x[-2:] == [ch["log_contract_flops"], ch["log_arith_elems"]]


def _rows(n: int, seed: int) -> np.ndarray:
    """Feature rows (ALL_NAMES) of made-up kernels: contractions, chains with transcendentals and conversions,
    in the three dtypes, over five decades of work."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, len(features.ALL_NAMES)))
    col = {c: i for i, c in enumerate(features.ALL_NAMES)}
    contraction = rng.random(n) < 0.5
    size = 10 ** rng.uniform(3, 8, n)
    work = {"log_contract_flops": np.where(contraction, size * rng.uniform(4, 64, n), 0),
            "log_arith_elems": np.where(contraction, 0, size * rng.integers(1, 6, n)),
            "log_trans_elems": np.where(contraction | (rng.random(n) < 0.5), 0, size * rng.integers(1, 3, n)),
            "log_convert_elems": np.where(rng.random(n) < 0.3, size, 0),
            "log_bytes_io": size * rng.uniform(2, 12, n)}
    for c, v in work.items():
        X[:, col[c]] = np.log2(v + 1)
    X[np.arange(n), [col[f"dtype_{d}"] for d in rng.choice(features.DTYPES, n)]] = 1.0
    return X


def test_pipe_base_fit_recovers_a_pipe_roofline():
    X = _rows(400, seed=0)
    y = np.exp(TRUE.log_us(X))
    got = fit_pipe_base(X, y)
    Xt = _rows(200, seed=1)
    yt = np.exp(TRUE.log_us(Xt))
    err = np.abs(np.exp(got.log_us(Xt)) / yt - 1)
    assert err.mean() < 0.05
    # one FLOP rate for every kind of work (LogBase) cannot describe these kernels
    one = fit_log_base(Xt, yt)
    assert np.abs(np.exp(one.log_us(Xt)) / yt - 1).mean() > 3 * err.mean()


def test_each_pipe_adds_its_time():
    X = _rows(50, seed=2)
    base = TRUE.log_us(X)
    slower = PipeBase(**{**asdict(TRUE), "trans_per_s": TRUE.trans_per_s / 10}).log_us(X)
    col = list(features.ALL_NAMES).index("log_trans_elems")
    has = X[:, col] > 0
    assert np.all(slower[~has] == base[~has]) and np.all(slower[has] >= base[has]) and np.any(slower > base)


def test_base_of_reads_each_kind_and_refuses_an_unknown_one():
    old = asdict(LogBase({"f32": 1e10, "bf16": 1e10, "i8": 1e10}, 1e10, 2.0))  # the first encoding: no kind
    assert isinstance(base_of(old), LogBase)
    assert isinstance(base_of(asdict(TRUE)), PipeBase) and asdict(TRUE)["kind"] == "pipes"
    with pytest.raises(CostModelError, match="spline"):
        base_of({**asdict(TRUE), "kind": "spline"})


def test_a_model_with_a_pipe_base_round_trips_and_an_unknown_base_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from memfit.plan.cost.fit import FitConfig, fit_seq
    from memfit.plan.cost.predict import load_model
    from memfit.plan.cost.seq import Bundle
    from tests.plan.cost.test_seq import synthetic

    ex = synthetic(60, seed=4)
    tr, va = ex.subset(np.arange(0, 48)), ex.subset(np.arange(48, 60))
    b = fit_seq(tr, va, FitConfig(epochs=2, d=16, layers=1, seeds=1, base="pipes"), verbose=False)
    assert b.base["kind"] == "pipes"
    path = tmp_path / "pipes.safetensors"
    b.save(str(path))
    load_model.cache_clear()
    again = load_model(str(path))
    assert again.base == b.base
    assert np.allclose(again.predict_log(va.toks, va.X)[:, 0], b.predict_log(va.toks, va.X)[:, 0], atol=0.05)
    # the same file with a base of a kind this version does not know: refused at load, not at predict
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={**meta, "base": json.dumps({**b.base, "kind": "spline"})})
    assert Bundle.load(str(bad)).base["kind"] == "spline"
    load_model.cache_clear()
    with pytest.raises(CostModelError, match="spline"):
        load_model(str(bad))
