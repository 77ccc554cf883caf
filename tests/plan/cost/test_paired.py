"""benchmarks/costmodel_paired.py: two runs' MAPE compared kernel by kernel with a paired bootstrap."""
import json

import numpy as np

from benchmarks.costmodel_paired import main, paired


def test_paired_difference_and_interval():
    true = np.array([10.0, 20.0, 40.0, 80.0])
    a = true * np.array([1.5, 0.5, 1.2, 1.0])  # errors 50, 50, 20, 0 %: MAPE 30%
    same = paired(a, a, true)
    assert same["diff_points"] == 0.0 and same["ci95_points"] == [0.0, 0.0]
    b = true * np.array([1.1, 0.9, 1.0, 1.0])  # 10, 10, 0, 0 %: MAPE 5%, better on every kernel but one tie
    r = paired(a, b, true)
    assert r["mape_a"] == np.float64(0.3) and abs(r["mape_b"] - 0.05) < 1e-12
    assert abs(r["diff_points"] + 25.0) < 1e-9 and r["ci95_points"][1] <= 0.0 < -r["ci95_points"][0]


def _run(path, true, seq, fams):
    path.write_text(json.dumps({"predictions": {"true": true, "seq": seq, "families": fams}}))
    return str(path)


def test_cli_per_family_and_refuses_other_kernels(tmp_path, capsys):
    fams = ["matmul", "matmul", "conv"]
    a = _run(tmp_path / "a.json", [1.0, 2.0, 4.0], [2.0, 2.0, 4.0], fams)
    b = _run(tmp_path / "b.json", [1.0, 2.0, 4.0], [1.0, 2.0, 2.0], fams)
    assert main([a, b, "--out", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["matmul"]["diff_points"] == -50.0 and out["conv"]["diff_points"] == 50.0
    assert out["benchmark"] == "costmodel_paired" and out["b"] == b  # the naming scheme test_package checks
    other = _run(tmp_path / "c.json", [1.0, 2.0, 5.0], [1.0, 2.0, 2.0], fams)
    assert main([a, other]) == 2


def test_pairs_over_seeds_average_each_kernels_difference(tmp_path):
    """--pair: two seeds' pairs; each kernel's difference is the mean over the pairs (here one seed's change
    is undone by the other's on the first kernel), and each pair's own figures are kept."""
    fams = ["matmul", "matmul", "conv"]
    true = [1.0, 2.0, 4.0]
    a0 = _run(tmp_path / "a0.json", true, [2.0, 2.0, 4.0], fams)   # errors 100, 0, 0 %
    b0 = _run(tmp_path / "b0.json", true, [1.0, 2.0, 2.0], fams)   # 0, 0, 50 %
    a1 = _run(tmp_path / "a1.json", true, [1.0, 2.0, 4.0], fams)   # 0, 0, 0 %
    b1 = _run(tmp_path / "b1.json", true, [2.0, 2.0, 4.0], fams)   # 100, 0, 0 %
    assert main([a0, b0, "--pair", a1, b1, "--out", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    # kernel 1: (0 - 100 + 100 - 0) / 2 = 0; kernel 3: (50 + 0) / 2 = 25 points
    assert out["all"]["pairs"] == 2 and abs(out["all"]["diff_points"] - 25.0 / 3) < 1e-9
    assert out["matmul"]["diff_points"] == 0.0 and out["conv"]["diff_points"] == 25.0
    assert abs(out["all"]["mape_a"] - 0.5 / 3) < 1e-12 and abs(out["all"]["mape_b"] - 1.5 / 3 / 2 * 1) < 1e-12
    assert np.allclose([p["all"]["diff_points"] for p in out["pairs"]], [-50.0 / 3, 100.0 / 3])
    assert out["pair_files"] == [[a0, b0], [a1, b1]]
    other = _run(tmp_path / "c.json", [1.0, 2.0, 5.0], [1.0, 2.0, 2.0], fams)
    assert main([a0, b0, "--pair", a1, other]) == 2
