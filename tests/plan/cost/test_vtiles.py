"""The vector-tile model (vtiles.py): the tile IREE's llvm-cpu lowering gives a kernel's dominant contraction,
read from the MLIR alone, checked against tiles IREE 3.13 chose for training kernels of the Intel host
(`iree-compile --compile-to=executable-configurations`: vector_common_parallel / vector_reduction), and the
costs the features derive from it."""
import math

import pytest

from memfit.plan.cost import features, paths, vtiles
from memfit.plan.cost.families import KernelSpec
from memfit.plan.cost.gemm import gemm_view
from memfit.plan.cost.ops import linalg_ops
from memfit.plan.cost.parse import pick_function


def _fn(family: str, dtype: str, params: dict):
    return pick_function(KernelSpec(family, dtype, params).mlir())


def _tile(family: str, dtype: str, params: dict) -> tuple[int, int, int]:
    ops = [o for o in linalg_ops(_fn(family, dtype, params)) if gemm_view(o)[0]]
    return vtiles.tile(max(ops, key=lambda o: o.flops()))


def test_divisor_tile():
    assert [vtiles.divisor_tile(x, 8) for x in (23, 196, 48, 3, 0)] == [1, 7, 8, 3, 1]  # 23 prime: 1
    assert vtiles.divisor_tile(126, 16) == 14 and vtiles.divisor_tile(1995, 32) == 21


@pytest.mark.parametrize("family,dtype,params,iree", [
    # (inner, rows, reduction step) as IREE chose them: vector_common_parallel [rows.., inner], vector_reduction
    ("matmul", "f32", {"M": 23, "K": 768, "N": 3072}, (16, 1, 16)),       # [1, 16], [16]: M prime, one row
    ("matmul", "f32", {"M": 256, "K": 23, "N": 30}, (30, 8, 1)),          # [8, 30], [1]: K prime
    ("matmul", "bf16", {"M": 196, "K": 256, "N": 635}, (5, 7, 16)),       # [7, 5], [16]: 635 = 5 x 127
    ("matmul", "i8", {"M": 256, "K": 34, "N": 1995}, (21, 8, 2)),         # [8, 21], [2]
    ("matmul", "f32", {"M": 240, "K": 41, "N": 192}, (32, 8, 1)),         # [8, 32]: a short K widens N
    ("conv", "bf16", {"kind": "conv_nhwc", "N": 1, "C": 40, "F": 61, "KH": 5, "stride": 1, "dilation": 1,
                      "OH": 28}, (1, 7, 8)),                             # [1, 1, 7, 1], C 8: F prime
    ("conv", "f32", {"kind": "conv_nchw", "N": 1, "C": 96, "F": 60, "KH": 1, "stride": 1, "dilation": 1,
                     "OH": 91}, (13, 6, 16)),                            # a matmul F x pixels: [6, 13], [16]
    ("conv", "f32", {"kind": "conv_nchw", "N": 1, "C": 48, "F": 48, "KH": 3, "stride": 1, "dilation": 1,
                     "OH": 28}, (7, 4, 8)),                              # [1, 4, 1, 7], C 8: OW innermost
    ("conv", "f32", {"kind": "conv_nchw", "N": 1, "C": 48, "F": 195, "KH": 3, "stride": 1, "dilation": 1,
                     "OH": 6}, (6, 15, 8)),                              # [1, 15, 1, 6]: F has no power of two
    ("conv", "i8", {"kind": "conv_nchw", "N": 2, "C": 24, "F": 32, "KH": 5, "stride": 2, "dilation": 1,
                    "OH": 28}, (7, 8, 8)),                               # [1, 8, 1, 7]: two images, F in 4
    ("conv", "i8", {"kind": "conv_nchw", "N": 1, "C": 16, "F": 48, "KH": 1, "stride": 1, "dilation": 1,
                    "OH": 112}, (32, 8, 16)),                            # [8, 32], [16]: a matmul's N rule
    ("conv", "f32", {"kind": "depthwise", "N": 1, "C": 12, "F": 12, "KH": 5, "stride": 1, "dilation": 1,
                     "OH": 17}, (12, 1, 1)),                             # [1, 1, 1, 12], one tap a step
])
def test_tiles_iree_chose(family, dtype, params, iree):
    assert _tile(family, dtype, params) == iree


def test_costs_follow_the_tile():
    f = vtiles.vtile(_fn("matmul", "f32", {"M": 23, "K": 768, "N": 3072}))
    work = 23 * 768 * 3072
    assert f["vt_log_inner"] == 4.0 and f["vt_lane_eff"] == 1.0 and f["vt_log_rows"] == 0.0
    assert f["vt_log_red"] == 4.0 and f["vt_log_tiles"] == pytest.approx(math.log2(work / 256))
    # a step of a 1 x 16 x 16 tile: 1 broadcast, 1 load, 1 FMA; then 2 accumulator moves a tile
    assert f["vt_log_insts"] == pytest.approx(math.log2(work / 256 * (16 * 3 + 2)))
    narrow = vtiles.vtile(_fn("matmul", "bf16", {"M": 196, "K": 256, "N": 635}))
    assert narrow["vt_lane_eff"] == pytest.approx(5 / 16)
    # one more row makes M divisible by 8: the same work in 8-row tiles, 17 instructions a step for 128
    # multiply-adds of 16 lanes against 3 for 16, takes 1.4x fewer instructions
    wide = vtiles.vtile(_fn("matmul", "f32", {"M": 24, "K": 768, "N": 3072}))
    assert wide["vt_log_rows"] == 3.0 and wide["vt_log_insts"] < f["vt_log_insts"] - 0.4


def test_no_contraction_is_all_zero():
    f = vtiles.vtile(_fn("elementwise", "f32", {"shape": [8, 63], "ops": ["relu"], "fused": True}))
    assert all(v == 0.0 for v in f.values())
    assert set(f) == set(vtiles.VTILE_NAMES)


def test_columns_come_after_the_path_columns():
    n = len(features.NAMES) + len(features.EXTRA_NAMES) + len(paths.PATH_NAMES)
    assert features.ALL_NAMES[n:n + len(vtiles.VTILE_NAMES)] == vtiles.VTILE_NAMES
    assert features.ALL_NAMES[-len(features.PIPE_NAMES):] == features.PIPE_NAMES
    x = features.full_vector(_fn("matmul", "f32", {"M": 23, "K": 768, "N": 3072}))
    assert len(x) == len(features.ALL_NAMES) and x[n] == 4.0


def test_rules_set_the_caps():
    """tile() reads its caps from a Rules (SHIPPED by default); benchmarks/costmodel_vtile_rules.py fits them."""
    ops = [o for o in linalg_ops(_fn("matmul", "i8", {"M": 24, "K": 48, "N": 96})) if gemm_view(o)[0]]
    assert vtiles.tile(ops[0]) == vtiles.tile(ops[0], vtiles.Rules()) == (32, 8, 16)
    assert vtiles.tile(ops[0], vtiles.Rules(mm_rows=4, mm_step=12, mm_i8_inner=48)) == (48, 4, 12)
    dw = [o for o in linalg_ops(_fn("conv", "f32", {"kind": "depthwise", "N": 1, "C": 12, "F": 12, "KH": 5,
                                                    "stride": 1, "dilation": 1, "OH": 17})) if gemm_view(o)[0]]
    assert vtiles.tile(dw[0], vtiles.Rules(dw_taps=5)) == (12, 1, 5)


def _conv(kind: str, dtype: str, n: int, c: int, f: int, kh: int, stride: int, dilation: int, oh: int):
    return _fn("conv", dtype, {"kind": kind, "N": n, "C": c, "F": f, "KH": kh, "stride": stride,
                               "dilation": dilation, "OH": oh})


def _conv_tile(rules: vtiles.Rules, *spec) -> tuple[int, int, int]:
    ops = [o for o in linalg_ops(_conv(*spec)) if gemm_view(o)[0]]
    return vtiles.tile(max(ops, key=lambda o: o.flops()), rules)


@pytest.mark.parametrize("spec,iree,shipped", [
    # IREE 3.13's tiles on the Zen 4 host's training kernels (distribution = [N, OH, OW, F] of the dump)
    (("conv_nhwc", "f32", 1, 64, 96, 7, 1, 1, 7), (16, 1, 8), (16, 7, 8)),   # [0, 1, 1, 96]: 7 rows, width cut to 1
    (("conv_nhwc", "f32", 1, 128, 32, 3, 1, 1, 4), (16, 2, 8), (16, 4, 8)),  # [0, 1, 2, 32]: 4 rows x 2 = 8
    (("conv_nhwc", "i8", 1, 476, 476, 7, 1, 1, 7), (2, 7, 7), (14, 7, 7)),   # [0, 1, 7, 34]: F in 14 shares of 34
    (("depthwise", "f32", 2, 86, 86, 7, 2, 1, 56), (1, 8, 1), (2, 8, 1)),    # [1, 14, 56, 43]: 86 in 2 x 43
    (("depthwise", "bf16", 1, 5, 5, 3, 1, 2, 7), (5, 1, 3), (5, 7, 3)),      # [0, 1, 1, 5]
    (("conv_nhwc", "bf16", 1, 40, 61, 5, 1, 1, 28), (1, 7, 8), (1, 7, 8)),   # 28 rows: nothing cut, both rules agree
    (("conv_nhwc", "f32", 1, 64, 384, 3, 1, 1, 7), (16, 7, 8), (16, 7, 8)),  # [0, 1, 7, 64]: 7 x 6 F shares, no cut
])
def test_workgroup_rules_follow_iree_where_shipped_does_not(spec, iree, shipped):
    assert _conv_tile(vtiles.WORKGROUPS, *spec) == iree
    assert _conv_tile(vtiles.SHIPPED, *spec) == shipped  # the shipped model's columns are unchanged


@pytest.mark.parametrize("spec,iree,shipped", [
    # IREE 3.13's tiles of NCHW 1x1 convolutions of stride 2 on the Intel host (vector_common_parallel
    # [1, 1, rows, inner], vector_reduction's C step), kernels of the 12000-label set
    (("conv_nchw", "f32", 1, 256, 144, 1, 2, 1, 28), (28, 1, 16), (14, 7, 16)),  # the width whole: 28 lanes
    (("conv_nchw", "f32", 2, 65, 384, 1, 2, 1, 23), (23, 1, 13), (1, 1, 13)),    # 23 prime: whole, not 1
    (("conv_nchw", "f32", 1, 233, 68, 1, 2, 1, 50), (25, 5, 1), (10, 5, 1)),     # 50: its divisor 25
    (("conv_nchw", "f32", 1, 16, 256, 1, 2, 1, 7), (7, 4, 16), (7, 7, 16)),      # 7 x 7 x 16 over 448: 4 rows
    (("conv_nchw", "f32", 2, 96, 192, 1, 2, 1, 32), (16, 1, 16), (16, 8, 16)),   # a multiple of 16: 16 lanes
    (("conv_nchw", "bf16", 2, 96, 192, 1, 2, 1, 32), (32, 1, 16), (16, 8, 16)),  # ... 32 for bf16
    (("conv_nchw", "bf16", 1, 336, 232, 1, 2, 1, 14), (14, 4, 16), (14, 7, 16)),  # bf16's budget: 896
    (("conv_nchw", "i8", 1, 69, 384, 1, 2, 1, 32), (32, 8, 3), (16, 8, 3)),
    (("conv_nchw", "i8", 2, 256, 27, 1, 2, 1, 21), (21, 4, 16), (7, 7, 16)),
])
def test_strided_rules_follow_iree_on_nchw_1x1_stride_2(spec, iree, shipped):
    assert _conv_tile(vtiles.STRIDED, *spec) == iree
    assert _conv_tile(vtiles.SHIPPED, *spec) == shipped  # the shipped model's columns are unchanged


def test_strided_rules_change_nothing_else():
    for spec in (("conv_nchw", "f32", 1, 48, 48, 3, 1, 1, 28), ("conv_nchw", "f32", 1, 96, 60, 1, 1, 1, 91),
                 ("conv_nhwc", "f32", 1, 64, 96, 1, 2, 1, 14), ("depthwise", "f32", 2, 86, 86, 7, 2, 1, 56)):
        assert _conv_tile(vtiles.STRIDED, *spec) == _conv_tile(vtiles.SHIPPED, *spec)
    assert vtiles.rules_named("strided") is vtiles.STRIDED


@pytest.mark.parametrize("params,iree,shipped", [
    # IREE 3.13's tiles of f32 matmuls whose N is not a multiple of 16 (Intel host, 12000-label set)
    ({"M": 256, "K": 256, "N": 500}, (16, 8, 16), (25, 8, 16)),   # divisor 25 over 16, full tile: 16 lanes
    ({"M": 296, "K": 1536, "N": 49}, (7, 8, 16), (16, 8, 16)),    # divisor 7: kept (SHIPPED: 16 up to N 64)
    ({"M": 197, "K": 576, "N": 462}, (22, 1, 16), (22, 1, 16)),   # one row: the divisor stays
    ({"M": 32, "K": 155, "N": 1000}, (25, 8, 5), (25, 8, 5)),     # a K step of 5: the divisor stays
    ({"M": 256, "K": 23, "N": 30}, (30, 8, 1), (30, 8, 1)),
])
def test_odd_n_rules_follow_iree_on_f32_matmuls(params, iree, shipped):
    op = max((o for o in linalg_ops(_fn("matmul", "f32", params)) if gemm_view(o)[0]), key=lambda o: o.flops())
    assert vtiles.tile(op, vtiles.ODD_N) == iree
    assert vtiles.tile(op) == shipped
    # bf16 and i8 keep SHIPPED's rule
    for dtype in ("bf16", "i8"):
        op = [o for o in linalg_ops(_fn("matmul", dtype, params)) if gemm_view(o)[0]][0]
        assert vtiles.tile(op, vtiles.ODD_N) == vtiles.tile(op)


@pytest.mark.parametrize("m,k,inner", [
    # ODD_N's two numbers (an N of 1000: divisor 25): 16 lanes from a K step of 11 and rows x step of 48
    (8, 10, 25), (8, 11, 16),      # rows 8: the step decides
    (2, 16, 25), (3, 16, 16),      # step 16: rows x step 32 against 48
])
def test_odd_n_thresholds(m, k, inner):
    op = [o for o in linalg_ops(_fn("matmul", "f32", {"M": m, "K": k, "N": 1000})) if gemm_view(o)[0]][0]
    assert vtiles.tile(op, vtiles.ODD_N) == (inner, m, k)


def test_odd_n_rules_keep_the_strided_ones():
    spec = ("conv_nchw", "f32", 1, 256, 144, 1, 2, 1, 28)
    assert _conv_tile(vtiles.ODD_N, *spec) == _conv_tile(vtiles.STRIDED, *spec) == (28, 1, 16)


def test_gathered_rules_count_a_strided_wide_f32_tile_lane_by_lane():
    """GATHERED: an f32 NCHW 1x1 stride-2 tile of 28 lanes moves its inner operand one lane at a time, 28 loads a
    step where a vector load takes 2; the instruction count follows. Nothing else changes."""
    wide = _conv("conv_nchw", "f32", 1, 256, 144, 1, 2, 1, 28)
    g, o = vtiles.vtile(wide, vtiles.GATHERED), vtiles.vtile(wide, vtiles.ODD_N)
    assert g["vt_log_inner_loads"] == pytest.approx(o["vt_log_inner_loads"] + math.log2(28 / 2))
    # a step of the 28 x 1 x 16 tile: 1 broadcast, 28 (not 2) loads, 2 FMAs; 4 accumulator moves a tile
    assert g["vt_log_insts"] - o["vt_log_insts"] == pytest.approx(math.log2((16 * 31 + 4) / (16 * 5 + 4)))
    assert {k: v for k, v in g.items() if k not in ("vt_log_inner_loads", "vt_log_insts")} == \
        {k: v for k, v in o.items() if k not in ("vt_log_inner_loads", "vt_log_insts")}
    for fn in (_conv("conv_nchw", "bf16", 1, 256, 144, 1, 2, 1, 28),     # bf16: IREE's vector code is fine
               _conv("conv_nchw", "f32", 1, 256, 144, 1, 2, 1, 32),      # 16 lanes: no part-filled vector
               _fn("matmul", "f32", {"M": 256, "K": 23, "N": 30})):      # 30 lanes, contiguous
        assert vtiles.vtile(fn, vtiles.GATHERED) == vtiles.vtile(fn, vtiles.ODD_N)


def test_layout_columns():
    """vt_wide_tail: the inner tile spans more than one vector and ends part-filled; vt_log_inner_stride: the
    input's stride along the inner loop (NCHW convolutions that vectorise the output width)."""
    def cols(fn, rules=vtiles.SHIPPED):
        return dict(zip(vtiles.LAYOUT_NAMES, vtiles.layout(fn, rules)))

    wide = _conv("conv_nchw", "f32", 1, 256, 144, 1, 2, 1, 28)
    assert cols(wide, vtiles.STRIDED) == {"vt_wide_tail": 1.0, "vt_log_inner_stride": 1.0}  # 28 = 16 + 12 lanes
    assert cols(wide) == {"vt_wide_tail": 0.0, "vt_log_inner_stride": 1.0}                   # SHIPPED's tile: 14
    assert cols(_conv("conv_nchw", "f32", 1, 48, 48, 3, 1, 1, 28)) == {"vt_wide_tail": 0.0, "vt_log_inner_stride": 0.0}
    assert cols(_conv("conv_nchw", "i8", 2, 24, 32, 5, 2, 1, 28))["vt_log_inner_stride"] == 1.0  # 5x5, stride 2
    assert cols(_conv("conv_nhwc", "f32", 1, 64, 96, 3, 2, 1, 14))["vt_log_inner_stride"] == 0.0  # F is contiguous
    assert cols(_fn("matmul", "f32", {"M": 256, "K": 23, "N": 30})) == {"vt_wide_tail": 1.0, "vt_log_inner_stride": 0.0}
    assert cols(_fn("matmul", "f32", {"M": 240, "K": 41, "N": 192}))["vt_wide_tail"] == 0.0  # 32 = 2 full vectors
    assert cols(_fn("matmul", "bf16", {"M": 196, "K": 256, "N": 635}))["vt_wide_tail"] == 0.0  # 5: one vector
    assert cols(_fn("elementwise", "f32", {"shape": [8, 63], "ops": ["relu"], "fused": True})) == \
        {"vt_wide_tail": 0.0, "vt_log_inner_stride": 0.0}
    # in the feature row right after the vtile columns, by the rules the row is computed with
    at = features.ALL_NAMES.index(vtiles.LAYOUT_NAMES[0])
    assert features.ALL_NAMES[at - 1] == vtiles.VTILE_NAMES[-1]
    assert features.full_vector(wide, vtiles.STRIDED)[at:at + 2] == [1.0, 1.0]
    # columns() (what full_vector reads) finds the tile once: the same as the tile and layout columns apart
    for rules in (vtiles.SHIPPED, vtiles.STRIDED, vtiles.GATHERED):
        v = vtiles.vtile(wide, rules)
        assert vtiles.columns(wide, rules) == [v[k] for k in vtiles.VTILE_NAMES] + vtiles.layout(wide, rules)


def test_examples_and_predict_use_the_rules_the_model_names(tmp_path):
    """dataset.from_rows computes the tile columns by the named rules; a model records its rules and `predict`
    computes its columns by them (an unknown name is refused at load)."""
    import numpy as np

    from memfit.plan.cost import dataset
    from memfit.plan.cost.errors import CostModelError
    from memfit.plan.cost.fit import FitConfig, fit_seq
    from memfit.plan.cost.predict import load_model, predict
    from tests.plan.cost.test_seq import synthetic

    mlir = KernelSpec("conv", "f32", {"kind": "conv_nhwc", "N": 1, "C": 64, "F": 96, "KH": 7, "stride": 1,
                                      "dilation": 1, "OH": 7}).mlir()
    rows = [{"key": "k", "family": "conv", "shape_key": "s", "mlir": mlir}]
    rows_col = features.ALL_NAMES.index("vt_log_rows")
    assert dataset.from_rows(rows).X[0, rows_col] == pytest.approx(math.log2(7))
    assert dataset.from_rows(rows, "workgroups").X[0, rows_col] == 0.0
    with pytest.raises(CostModelError, match="unknown vector tile rules"):
        dataset.from_rows(rows, "nope")

    ex = synthetic(40, seed=5)
    b = fit_seq(ex.subset(np.arange(0, 32)), ex.subset(np.arange(32, 40)),
                FitConfig(epochs=1, d=16, layers=1, seeds=1), verbose=False)
    paths_ = {}
    for name in ("shipped", "workgroups", "strided", "spline"):
        b.info["vtile_rules"] = name
        paths_[name] = tmp_path / f"{name}.safetensors"
        b.save(str(paths_[name]))
    load_model.cache_clear()
    by = {name: predict(mlir, model=str(paths_[name]))["latency_us"] for name in ("shipped", "workgroups")}
    assert by["shipped"] != by["workgroups"]  # the columns the model reads differ only by the rules it names
    strided = KernelSpec("conv", "f32", {"kind": "conv_nchw", "N": 1, "C": 256, "F": 144, "KH": 1, "stride": 2,
                                         "dilation": 1, "OH": 28}).mlir()
    assert (predict(strided, model=str(paths_["strided"]))["latency_us"]
            != predict(strided, model=str(paths_["shipped"]))["latency_us"])
    assert predict(mlir, model=str(paths_["strided"]))["latency_us"] == by["shipped"]  # not an NCHW 1x1 stride 2
    del b.info["vtile_rules"]  # every model before the key: the shipped rules
    b.save(str(tmp_path / "old.safetensors"))
    assert predict(mlir, model=str(tmp_path / "old.safetensors"))["latency_us"] == by["shipped"]
    with pytest.raises(CostModelError, match="spline"):
        load_model(str(paths_["spline"]))
