"""Tile-aware features: padding, divisibility, tile counts, registers and footprints, checked against sums
done by hand for small shapes."""
import math

import pytest

from memfit.plan.cost import tiles
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.tune import candidates

from .conftest import TINY_MATMUL

XEON = tiles.Host()  # the AVX-512 Xeon's constants: the hand sums below are done against them


def xeon_features(m, n, k, tile):
    return tiles.features(m, n, k, tile, XEON)


def test_padding_and_divisibility():
    f = xeon_features(49, 470, 593, (8, 32, 16))
    # M: 7 tiles of 8 cover 56 rows for 49; N: 15 x 32 = 480 for 470; K: 38 x 16 = 608 for 593
    assert f["pad_m"] == pytest.approx(56 / 49 - 1)
    assert f["pad_n"] == pytest.approx(480 / 470 - 1)
    assert f["pad_k"] == pytest.approx(608 / 593 - 1)
    assert f["pad_work"] == pytest.approx(56 * 480 * 608 / (49 * 470 * 593) - 1)
    assert (f["divides_m"], f["divides_n"], f["divides_k"], f["divides_all"]) == (0.0, 0.0, 0.0, 0.0)
    assert f["log_tiles"] == pytest.approx(math.log2(7 * 15 * 38))
    g = xeon_features(64, 128, 256, (8, 32, 16))
    assert g["pad_work"] == 0.0 and g["divides_all"] == 1.0 and g["rem64_m"] == 0.0


def test_registers_against_the_32_zmm():
    # 16 x 32 accumulators in f32 are 16 rows x 2 zmm = 32 registers, with 16 k-steps of B rows on top
    big = xeon_features(256, 256, 256, (16, 32, 16))
    assert big["acc_regs"] == 32 and big["b_regs"] == 32 and big["regs_over"] > 0
    small = xeon_features(256, 256, 256, (1, 16, 1))
    assert small["acc_regs"] == 1 and small["regs_needed"] == 3 and small["regs_over"] == 0
    assert small["reg_ratio"] == pytest.approx(3 / 32)


def test_footprints_scale_with_k_and_the_tile():
    a = xeon_features(64, 64, 512, (8, 16, 1))
    b = xeon_features(64, 64, 1024, (8, 16, 1))
    # the A row panel and B column panel grow with K: (8*K + K*16 + 8*16) f32
    assert 2 ** a["log_panel_l1"] * 48 * 1024 == pytest.approx((8 * 512 + 512 * 16 + 128) * 4)
    assert b["log_panel_l2"] > a["log_panel_l2"]
    assert xeon_features(64, 64, 64, (16, 32, 16))["log_vector_bytes"] == pytest.approx(math.log2(32768))


def test_shape_and_tile_read_from_the_candidates():
    c = candidates(TINY_MATMUL)
    assert tiles.shape_and_tile(pick_function(c["default"])) == ((16, 16, 32), None)
    assert tiles.shape_and_tile(pick_function(c["tile_8x32x16"])) == ((16, 16, 32), (8, 32, 16))
    assert tiles.shape_and_tile(pick_function(c["tile_1x16x1"])) == ((16, 16, 32), (1, 16, 1))
    assert len(tiles.vector(16, 16, 32, (1, 16, 1))) == len(tiles.NAMES)
    with pytest.raises(CostModelError, match="matmul"):
        tiles.shape_and_tile(pick_function(TINY_MATMUL.replace("linalg.matmul", "linalg.batch_matmul")))


def test_the_host_is_read_from_the_cpu_flags_and_sysfs(tmp_path):
    for level, kind, size in ((1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"), (3, "Unified", "32M")):
        d = tmp_path / f"index{level}{kind[0]}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n"), (d / "type").write_text(kind + "\n"), (d / "size").write_text(size + "\n")
    amd = tiles.Host.detect("processor : 0\nflags : fpu sse2 avx avx2 fma\n", tmp_path)
    assert (amd.vector_regs, amd.lanes, amd.l1_bytes, amd.l2_bytes) == (16, 8, 32 * 1024, 512 * 1024)
    xeon = tiles.Host.detect("flags : fpu avx2 avx512f avx512bw\n", tmp_path / "none")  # no sysfs: default sizes
    assert xeon == tiles.Host(32, 16)
    assert tiles.Host.detect("flags : fpu sse2\n", tmp_path).lanes == 4


def test_features_follow_the_host():
    """The same candidate needs twice the ymm registers of zmm ones, and 16 of them, not 32, are there."""
    amd = tiles.Host(16, 8, 32 * 1024, 512 * 1024)
    on_amd, on_xeon = (tiles.features(256, 256, 256, (4, 32, 4), h) for h in (amd, XEON))
    assert on_amd["acc_regs"] == 2 * on_xeon["acc_regs"] == 16
    assert on_amd["regs_over"] > 0 == on_xeon["regs_over"]
    assert on_amd["log_panel_l2"] == pytest.approx(on_xeon["log_panel_l2"] + 2)  # 2 MiB / 512 KiB
    assert tiles.features(256, 256, 256, (8, 32, 8)) == tiles.features(256, 256, 256, (8, 32, 8), tiles.this_host())
