"""The code-path features (paths.py): how far the vectorised loops fall short of a full vector, a strided
contiguous axis, an outer-axis reduction, read from the MLIR the generator writes; 0 where a loop is absent."""
import math

import pytest

from memfit.plan.cost import features, paths
from memfit.plan.cost.families import KernelSpec
from memfit.plan.cost.parse import pick_function
from tests.plan.cost.test_blend import REDUCE_FIRST


def _path(family: str, dtype: str, params: dict) -> dict:
    return paths.path(pick_function(KernelSpec(family, dtype, params).mlir()))


def test_divisors():
    assert [paths.pow2_divisor(x) for x in (47, 48, 64, 256, 0)] == [0.0, 4.0, 6.0, 6.0, 0.0]  # capped at 64
    assert paths.lanes(47) == 0.0           # prime: no vector loop without a remainder
    assert paths.lanes(30) == pytest.approx(paths.lanes(15))  # 15 lanes divide 30; 16 do not
    assert paths.lanes(48) == 4.0


def test_matmul_dims_in_gemm_order():
    f = _path("matmul", "f32", {"M": 96, "K": 60, "N": 47})
    assert (f["short_m"], f["short_k"], f["short_n"]) == (1.0, 4.0, 6.0)  # 32 | 96, 4 | 60, 47 odd
    assert f["short_lanes_n"] == 4.0 and f["short_inner_out"] == 6.0
    aligned = _path("matmul", "f32", {"M": 128, "K": 64, "N": 256})
    assert all(aligned[n] == 0.0 for n in ("short_m", "short_n", "short_k", "short_lanes_n"))


def test_absent_loops_are_no_penalty():
    # an element-wise chain has no contraction and no reduction: those shortfalls are 0, as for aligned loops,
    # not 6 as for the odd dimensions of the slowest training kernels (what made held-out chains read slow)
    f = _path("elementwise", "f32", {"shape": [8, 64], "ops": ["relu", "exp"], "fused": True})
    for n in ("short_m", "short_n", "short_k", "short_lanes_n", "short_conv_ow", "short_reduce",
              "short_kept_inner", "conv_inner_strided", "reduce_outer_elems"):
        assert f[n] == 0.0, n
    odd = _path("elementwise", "f32", {"shape": [8, 63], "ops": ["relu"], "fused": True})
    assert odd["short_inner_out"] == odd["short_inner_in"] == 6.0  # a loop it has counts
    softmax = _path("softmax", "f32", {"shape": [4, 47]})
    assert softmax["short_reduce"] == 6.0 and softmax["short_n"] == 0.0  # a reduction, no contraction


def test_conv_strided_contiguous_axis_only_in_nchw():
    conv = {"N": 1, "C": 32, "F": 128, "KH": 1, "stride": 2, "dilation": 1, "OH": 28}
    nchw = _path("conv", "f32", {**conv, "kind": "conv_nchw"})
    nhwc = _path("conv", "f32", {**conv, "kind": "conv_nhwc"})
    assert nchw["conv_inner_strided"] == 1.0 and nhwc["conv_inner_strided"] == 0.0
    assert nchw["short_conv_ow"] == nhwc["short_conv_ow"] == 4.0  # OW = 28 either way: 4 | 28
    one = _path("conv", "f32", {**conv, "kind": "conv_nchw", "stride": 1})
    assert one["conv_inner_strided"] == 0.0


def test_outer_reduction_counts_its_input():
    f = paths.path(pick_function(REDUCE_FIRST))    # 64x8 summed over the first axis
    assert f["short_reduce"] == 0.0 and f["short_kept_inner"] == 3.0  # 64 rows summed, 8 kept
    assert f["reduce_outer_elems"] == pytest.approx(math.log2(64 * 8 + 1))  # its input elements


def test_path_columns_follow_the_older_ones():
    # a model file trained before reads the leading columns: new ones go last (the pipe columns after these)
    n = len(features.NAMES) + len(features.EXTRA_NAMES)
    assert features.ALL_NAMES[n:n + len(paths.PATH_NAMES)] == paths.PATH_NAMES
    assert features.ALL_NAMES[:len(features.NAMES)] == features.NAMES
    assert features.ALL_NAMES[-len(features.PIPE_NAMES):] == features.PIPE_NAMES


def test_a_model_of_the_old_encoding_is_refused(tmp_path):
    # the columns changed meaning (power of two -> shortfall) under new names: a model file naming the old ones
    # must fail to load, not predict from columns read the wrong way round
    import numpy as np

    from memfit.plan.cost.errors import CostModelError
    from memfit.plan.cost.fit import FitConfig, fit_seq
    from memfit.plan.cost.predict import load_model
    from tests.plan.cost.test_seq import synthetic

    ex = synthetic(40, seed=1)
    b = fit_seq(ex.subset(np.arange(30)), ex.subset(np.arange(30, 40)),
                FitConfig(epochs=1, d=8, layers=1, seeds=1), verbose=False)
    load_model.cache_clear()
    b.save(str(tmp_path / "now.safetensors"))
    assert load_model(str(tmp_path / "now.safetensors")).feature_names == list(features.DEFAULT_NAMES)
    old = {"short_m": "p2_m", "short_n": "p2_n", "short_lanes_n": "lanes_n"}
    b.feature_names = [old.get(n, n) for n in features.ALL_NAMES]
    b.save(str(tmp_path / "old.safetensors"))
    with pytest.raises(CostModelError, match="'p2_m'"):
        load_model(str(tmp_path / "old.safetensors"))
    # nets of the older columns only (still computed the same) load; trees reading renamed columns do not
    b.feature_names = list(features.NAMES)
    b.blend = {"weight": 1.0, "names": [old.get(n, n) for n in features.ALL_NAMES]}
    b.save(str(tmp_path / "trees.safetensors"))
    with pytest.raises(CostModelError, match="'p2_m'"):
        load_model(str(tmp_path / "trees.safetensors"))
    b.blend["names"] = list(features.ALL_NAMES)
    b.save(str(tmp_path / "fine.safetensors"))
    assert load_model(str(tmp_path / "fine.safetensors")).feature_names == list(features.NAMES)
    load_model.cache_clear()
