"""benchmarks/costmodel_variants.py: the blend's choices read the validation rows alone, the per-family shift
and the calibration recover a known offset, and the working-set columns of a known matmul."""
import math

import numpy as np
import pytest

from benchmarks import costmodel_variants as V
from memfit.plan.cost import vtiles
from memfit.plan.cost.families import KernelSpec
from memfit.plan.cost.parse import pick_function


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    true = np.exp(rng.uniform(0, 8, n))
    va, te = np.arange(0, n // 2), np.arange(n // 2, n)
    return true, va, te


def test_blend_choice_reads_validation_only():
    true, va, te = _data()
    y = np.log(true)
    nets, trees = y.copy(), y + 0.5          # the nets exact, the trees 1.65x slow
    z, choice = V.choose_blend(nets, trees, true, va)
    assert choice == {"weight": 1.0, "shift": 0.0} and np.allclose(z, nets)
    wrong = true.copy()
    wrong[te] *= 3.0                         # the test labels do not move the choice
    assert V.choose_blend(nets, trees, wrong, va)[1] == choice
    nets_val_off = nets.copy()
    nets_val_off[va] += 1.0                  # on validation the trees now win
    assert V.choose_blend(nets_val_off, trees, true, va)[1]["weight"] < 0.5


def test_family_shift_and_calibration_recover_an_offset():
    true, va, te = _data()
    fam = np.array(["a", "b"] * 20)
    z = np.log(true) + np.where(fam == "a", -0.2, 0.1)
    out, info = V.family_shift(z, true, fam, va)
    assert info["shifts"] == {"a": 0.2, "b": -0.1} and np.allclose(out, np.log(true))
    cal, c = V.calibrate(np.log(true) - 0.05, true, va)
    assert abs(c["b"] - 1.0) < 1e-9 and abs(c["a"] - 0.05) < 1e-9 and np.allclose(cal, np.log(true))


def test_working_set_of_a_matmul():
    spec = KernelSpec("matmul", "f32", {"M": 64, "K": 128, "N": 256})
    fn = pick_function(spec.mlir())
    f = dict(zip(V.WORKING_SET, V.working_set(fn)))
    a, b, c = 64 * 128 * 4, 128 * 256 * 4, 64 * 256 * 4
    assert f["a_log"] == math.log2(a + 1) and f["b_log"] == math.log2(b + 1) and f["c_log"] == math.log2(c + 1)
    assert f["ws_log"] == math.log2(a + b + c + 1) and (f["ws_l1"], f["ws_l2"], f["ws_l3"]) == (1.0, 0.0, 0.0)
    from benchmarks.costmodel_vtile_rules import contraction

    inner = vtiles.tile(contraction(spec.mlir()))[0]
    assert f["panel_log"] == math.log2(128 * inner * 4 + 1) and f["wg_log"] == 2.0  # 64 x 256 / 64^2 = 4 tiles
    assert f["conv_in_log"] == 0.0


def test_oracle_columns_put_iree_tile_in_the_tile_and_layout_columns(tmp_path):
    """IREE's tile from a dump replaces the modelled one in the 8 tile columns and the 2 layout columns after
    them; a tile the model's rules got wrong is counted."""
    from memfit.plan.cost import dataset, features, vtiles
    from memfit.plan.cost.families import KernelSpec

    spec = KernelSpec("conv", "f32", {"kind": "conv_nchw", "N": 1, "C": 256, "F": 144, "KH": 1, "stride": 2,
                                      "dilation": 1, "OH": 28})
    rows = [{"key": "k", "family": "conv", "shape_key": "s", "mlir": spec.mlir()}]
    (tmp_path / "k.mlir").write_text(
        "%7 = linalg.generic {} ins(%a, %b : tensor<x>, tensor<y>) outs(%5) attrs = {lowering_config = "
        "#iree_cpu.lowering_config<vector_common_parallel = [1, 1, 1, 28, 0, 0, 0], "
        "vector_reduction = [0, 0, 0, 0, 16, 1, 1]>} {\n")
    at = features.ALL_NAMES.index(vtiles.VTILE_NAMES[0])
    n = len(vtiles.VTILE_NAMES) + len(vtiles.LAYOUT_NAMES)
    ex = dataset.from_rows(rows)                     # SHIPPED's tile: 14 x 7 x 16
    X, have, wrong = V.oracle_columns(ex, tmp_path)
    assert (have, wrong) == (1, 1)
    f = vtiles.features_of(28, 1, 16, 144 * 28 * 28 * 256)
    assert list(X[0, at:at + n]) == pytest.approx([f[k] for k in vtiles.VTILE_NAMES] + [1.0, 1.0])
    assert list(ex.X[0, at + n - 2:at + n]) == [0.0, 1.0]   # the modelled 14 lanes: no part-filled vector
    ex = dataset.from_rows(rows, "strided")          # STRIDED's tile is IREE's: the same row, nothing wrong
    X, have, wrong = V.oracle_columns(ex, tmp_path, vtiles.STRIDED)
    assert (have, wrong) == (1, 0) and list(X[0]) == pytest.approx(list(ex.X[0]))
