"""The code-path features (paths.py): powers of two dividing the vectorised loops, a strided contiguous axis, an
outer-axis reduction, read from the MLIR the generator writes."""
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
    assert (f["p2_m"], f["p2_k"], f["p2_n"]) == (5.0, 2.0, 0.0)
    assert f["lanes_n"] == 0.0 and f["p2_inner_out"] == 0.0


def test_conv_strided_contiguous_axis_only_in_nchw():
    conv = {"N": 1, "C": 32, "F": 128, "KH": 1, "stride": 2, "dilation": 1, "OH": 28}
    nchw = _path("conv", "f32", {**conv, "kind": "conv_nchw"})
    nhwc = _path("conv", "f32", {**conv, "kind": "conv_nhwc"})
    assert nchw["conv_inner_strided"] == 1.0 and nhwc["conv_inner_strided"] == 0.0
    assert nchw["p2_conv_ow"] == nhwc["p2_conv_ow"] == 2.0  # OW = 28 either way
    one = _path("conv", "f32", {**conv, "kind": "conv_nchw", "stride": 1})
    assert one["conv_inner_strided"] == 0.0


def test_outer_reduction_counts_its_input():
    f = paths.path(pick_function(REDUCE_FIRST))    # 64x8 summed over the first axis
    assert f["p2_reduce"] == 6.0 and f["p2_kept_inner"] == 3.0
    assert f["reduce_outer_elems"] == pytest.approx(math.log2(64 * 8 + 1))  # its input elements


def test_path_columns_follow_the_older_ones():
    # a model file trained before reads the leading columns: new ones go last
    assert features.ALL_NAMES[-len(paths.PATH_NAMES):] == paths.PATH_NAMES
    assert features.ALL_NAMES[:len(features.NAMES)] == features.NAMES
