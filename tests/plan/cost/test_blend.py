"""The extra work features, the roofline-residual trees, and the bundle that blends them with the nets."""
import numpy as np
import pytest

from memfit.plan.cost import dataset, features
from memfit.plan.cost.fit import FitConfig, fit_seq
from memfit.plan.cost.metrics import mape
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.roofline import LogBase
from memfit.plan.cost.seq import Bundle
from memfit.plan.cost.train import fit_blend
from tests.plan.cost.test_seq import synthetic

pytest.importorskip("lightgbm")

BASE = {"flops": {"f32": 4e10, "bf16": 2e10, "i8": 8e10}, "bytes_per_s": 1.5e10, "overhead_us": 3.0}

REDUCE_FIRST = """func.func @main(%x: tensor<64x8xf32>) -> tensor<8xf32> {
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<8xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<8xf32>) -> tensor<8xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d1)>],
       iterator_types = ["reduction", "parallel"]} ins(%x : tensor<64x8xf32>) outs(%acc : tensor<8xf32>) {
  ^bb0(%in: f32, %out: f32):
    %s = arith.addf %in, %out : f32
    linalg.yield %s : f32
  } -> tensor<8xf32>
  return %r : tensor<8xf32>
}
"""


def test_reduction_features_name_the_reduced_axis():
    f = features.extra(pick_function(REDUCE_FIRST))
    assert f["log_reduce_elems"] == pytest.approx(np.log2(65))   # the first axis, 64, not the last (8)
    assert f["log_parallel_elems"] == pytest.approx(np.log2(9))
    assert f["reduce_inner"] == 0.0
    assert len(features.full_vector(pick_function(REDUCE_FIRST))) == len(features.ALL_NAMES)


def work_labelled(n: int, seed: int) -> dataset.Examples:
    """The roofline of BASE times 3 where transcendental work is large: a factor the trees can read off the
    extra features and the roofline cannot."""
    ex = synthetic(n, seed)
    col = list(features.ALL_NAMES).index("log_trans_elems")
    ex.Y[:, 0] = np.exp(LogBase(**BASE).log_us(ex.X)) * np.where(ex.X[:, col] > 10, 3.0, 1.0)
    return ex


def test_residual_trees_blend_and_round_trip(tmp_path):
    ex = work_labelled(160, seed=7)
    tr, va = ex.subset(np.arange(0, 120)), ex.subset(np.arange(120, 160))
    # barely trained nets: the trees must take most of the blend
    b = fit_seq(tr, va, FitConfig(epochs=1, d=8, layers=1, seeds=1, lr=1e-4), verbose=False)
    nets = dataset.from_log(b.predict_log(va.toks, va.X))[:, 0]
    scores = fit_blend(b, tr, va)
    assert b.blend is not None and b.blend["weight"] <= 0.5
    assert b.info["blend_val_mape"] <= min(scores.values())  # the shift is chosen after the weight
    blended = dataset.from_log(b.predict_log(va.toks, va.X))[:, 0]
    assert mape(blended, va.Y[:, 0]) < 0.5 * mape(nets, va.Y[:, 0])
    b.save(str(tmp_path / "b.safetensors"))
    again = Bundle.load(str(tmp_path / "b.safetensors"))
    assert again.blend["weight"] == b.blend["weight"]
    assert np.allclose(dataset.from_log(again.predict_log(va.toks, va.X))[:, 0], blended, rtol=0.05)
    # the nets read only their own columns: the bundle predicts the same from rows of NAMES + anything after
    wide = np.hstack([va.X, np.full((len(va), 3), 1e9)])
    with_nets_only = Bundle(b.nets, b.vocab, b.norm, b.feature_names, {}, b.base)
    assert np.allclose(with_nets_only.predict_log(va.toks, wide)[:, 0],
                       with_nets_only.predict_log(va.toks, va.X)[:, 0])


def test_residual_trees_learn_the_factor_and_round_trip():
    from memfit.plan.cost.gbm import ResidualGBM

    ex = work_labelled(120, seed=3)
    tr, va = ex.subset(np.arange(0, 90)), ex.subset(np.arange(90, 120))
    g = ResidualGBM(BASE).fit(tr, va)
    # beside LogBase the trees read the default columns, not the pipe columns computed after them
    assert g.n_features == len(features.DEFAULT_NAMES) and g.to_json()["names"] == list(features.DEFAULT_NAMES)
    assert mape(np.exp(g.predict_log(va.X)), va.Y[:, 0]) < 0.2
    again = ResidualGBM.from_json(g.to_json())
    assert np.allclose(again.predict_log(va.X), g.predict_log(va.X))
    with pytest.raises(Exception, match="features"):
        g.predict_log(va.X[:, :len(features.NAMES)])


def test_a_model_of_another_cpu_warns(caplog):
    from memfit.plan.cost import iree
    from memfit.plan.cost.predict import check_host

    ex = synthetic(30, seed=2)
    b = fit_seq(ex.subset(np.arange(20)), ex.subset(np.arange(20, 30)),
                FitConfig(epochs=1, d=8, layers=1, seeds=1), verbose=False)
    here = iree.host_cpu()
    b.info["host_cpu"] = here.rsplit(";", 1)[0] + "; 64 cpus)"  # more cores of this CPU: the same CPU
    with caplog.at_level("WARNING"):
        assert check_host(b, "m.safetensors")
    assert not caplog.records
    b.info["host_cpu"] = "Some Other CPU (avx2 fma; 2 cpus)"
    with caplog.at_level("WARNING"):
        assert not check_host(b, "m.safetensors")
    assert "another CPU" in caplog.text and "Some Other CPU" in caplog.text


def test_the_blend_is_weight_trees_and_shift():
    from memfit.plan.cost.gbm import ResidualGBM

    ex = work_labelled(120, seed=11)
    tr, va = ex.subset(np.arange(0, 90)), ex.subset(np.arange(90, 120))
    b = fit_seq(tr, va, FitConfig(epochs=2, d=8, layers=1, seeds=1), verbose=False)
    nets = b.predict_log(va.toks, va.X)[:, 0]
    fit_blend(b, tr, va, shifts=np.array([-0.2]))  # the only shift offered
    w, trees = b.blend["weight"], ResidualGBM.from_json(b.blend).predict_log(va.X)
    assert b.blend["shift"] == -0.2
    assert np.allclose(b.predict_log(va.toks, va.X)[:, 0], w * nets + (1 - w) * trees - 0.2)


def test_the_nets_read_the_features_they_were_given():
    ex = synthetic(40, seed=4)
    tr, va = ex.subset(np.arange(30)), ex.subset(np.arange(30, 40))
    for which, base, names in (("names", "roofline", features.NAMES), ("all", "roofline", features.DEFAULT_NAMES),
                               ("all", "none", features.DEFAULT_NAMES), ("all", "pipes", features.ALL_NAMES)):
        b = fit_seq(tr, va, FitConfig(epochs=1, d=8, layers=1, seeds=1, features=which, base=base), verbose=False)
        assert b.feature_names == list(names) and b.net.cfg.n_global == len(names)
    with pytest.raises(ValueError, match="features"):
        FitConfig(features="some")


def test_the_blend_keeps_the_tree_size_that_scores_best_on_validation():
    ex = work_labelled(160, seed=13)
    tr, va = ex.subset(np.arange(0, 120)), ex.subset(np.arange(120, 160))
    b = fit_seq(tr, va, FitConfig(epochs=1, d=8, layers=1, seeds=1, lr=1e-4), verbose=False)
    by_size = {}
    for leaves in ((2,), (15,)):
        fit_blend(b, tr, va, leaves=leaves)
        by_size[leaves[0]] = b.info["blend_val_mape"]
    assert by_size[2] != by_size[15]
    fit_blend(b, tr, va, leaves=(2, 15))
    best = min(by_size, key=by_size.get)
    assert b.info["trees_leaves"] == best and b.info["blend_val_mape"] == by_size[best]
    fit_blend(b, tr, va, leaves=(15, 2))  # the order offered does not matter
    assert b.info["trees_leaves"] == best


def test_the_default_columns_leave_the_pipe_columns_to_the_pipe_base():
    # the 72 columns a model reads by default (the 62 before vtiles, its 8 and its 2 layout columns; the Zen 4
    # model reads the first 70); the two pipe columns come after them and only the pipe base reads them
    assert len(features.DEFAULT_NAMES) == 72 and features.ALL_NAMES == (*features.DEFAULT_NAMES, *features.PIPE_NAMES)
    assert features.columns("roofline") == features.columns("none") == features.columns(None) == features.DEFAULT_NAMES
    assert features.columns("pipes") == features.ALL_NAMES
    assert FitConfig().names == features.DEFAULT_NAMES


def test_trees_and_lightgbm_read_the_pipe_columns_only_beside_the_pipe_base():
    from dataclasses import asdict

    from memfit.plan.cost.gbm import GBM, ResidualGBM
    from memfit.plan.cost.roofline import fit_pipe_base

    ex = work_labelled(120, seed=5)
    tr, va = ex.subset(np.arange(0, 90)), ex.subset(np.arange(90, 120))
    pipes = ResidualGBM(asdict(fit_pipe_base(tr.X, tr.Y[:, 0], steps=50))).fit(tr, va)
    assert pipes.n_features == len(features.ALL_NAMES)
    assert GBM(n_estimators=5).fit(tr, va).models[0].num_feature() == len(features.DEFAULT_NAMES)
    assert GBM(n_estimators=5, base="pipes").fit(tr, va).models[0].num_feature() == len(features.ALL_NAMES)


def test_kind_of_reads_the_op_counts():
    from memfit.plan.cost.gbm import kind_of

    ex = synthetic(200, seed=21)
    kinds, fam = kind_of(ex.X), np.array(ex.families)
    assert set(kinds[fam == "conv"]) == {0}
    assert set(kinds[np.isin(fam, ["matmul", "batch_matmul"])]) == {1}
    assert set(kinds[np.isin(fam, ["elementwise", "reduction", "softmax", "layernorm"])]) == {2}
    assert set(kinds[fam == "fused"]) == {0, 1}  # a conv or a matmul with its epilogue
    # a kernel with both a convolution and a matmul is a convolution (the docstring's order)
    from memfit.plan.cost.features import ALL_NAMES

    both = np.zeros((1, len(ALL_NAMES)))
    both[0, ALL_NAMES.index("n_conv_nhwc")] = both[0, ALL_NAMES.index("n_matmul")] = 1
    assert kind_of(both).tolist() == [0]


def test_trees_of_each_kind_are_averaged_with_the_shared_trees(tmp_path):
    import json

    from memfit.plan.cost import trees
    from memfit.plan.cost.gbm import KINDS, ResidualGBM, kind_of

    ex = work_labelled(300, seed=17)
    tr, va = ex.subset(np.arange(0, 220)), ex.subset(np.arange(220, 300))
    shared = ResidualGBM(BASE).fit(tr, va)
    g = ResidualGBM(BASE, by_kind=True).fit(tr, va)
    assert set(g.kind_trees) == set(KINDS) and "kind_trees" not in shared.to_json()
    base = LogBase(**BASE).log_us(va.X)
    expect = shared.predict_log(va.X) - base  # the shared trees are the same fit (same seed)
    kinds = kind_of(va.X)
    for i, k in enumerate(KINDS):
        m = kinds == i
        assert m.any()
        expect[m] = 0.5 * (expect[m] + trees.predict(g.kind_trees[k], va.X[m][:, :g.n_features]))
    assert np.allclose(g.predict_log(va.X), base + expect)
    assert not np.allclose(g.predict_log(va.X), shared.predict_log(va.X))
    again = ResidualGBM.from_json(json.loads(json.dumps(g.to_json())))
    assert np.allclose(again.predict_log(va.X), g.predict_log(va.X))
    # a kind with too few training rows keeps the shared trees alone
    few = ResidualGBM(BASE, by_kind=True, min_kind=10 ** 6).fit(tr, va)
    assert few.kind_trees == {} and np.allclose(few.predict_log(va.X), shared.predict_log(va.X))
    # through the blend and a model file
    b = fit_seq(tr, va, FitConfig(epochs=1, d=8, layers=1, seeds=1), verbose=False)
    fit_blend(b, tr, va, by_kind=True)
    assert b.info["trees_by_kind"] == sorted(KINDS) and set(b.blend["kind_trees"]) == set(KINDS)
    b.save(str(tmp_path / "k.safetensors"))
    loaded = Bundle.load(str(tmp_path / "k.safetensors"))
    assert np.allclose(loaded.predict_log(va.toks, va.X)[:, 0], b.predict_log(va.toks, va.X)[:, 0], atol=0.05)
    assert np.allclose(ResidualGBM.from_json(loaded.blend).predict_log(va.X),
                       ResidualGBM.from_json(b.blend).predict_log(va.X))
