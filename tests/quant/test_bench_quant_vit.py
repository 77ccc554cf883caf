"""benchmarks/quant_vit.py: the budgets each allocator gets, the machine's load recorded in its JSON, and the paired
per-image comparison with `uniform` (McNemar's exact test, the paired bootstrap, the per-image record), each
checked on cases whose answer is known."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import quant_vit as qv
from benchmarks.quant_vit import budget
from memfit.quant.allocators import uniform_budget
from memfit.quant.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("allocator", ["lrp-zplus", "context", "random", "sensitivity"])
def test_equal_spend_gives_uniforms_budget_at_whole_widths_and_the_setting_between_them(tiny_models, allocator):
    model = tiny_models["vit"][0]
    for avg in (3.0, 4.0):
        u = uniform_budget(model, avg)
        assert u > avg  # the 8-bit fixed layers put uniform a hair over
        assert budget(allocator, avg, u, equal_spend=True) == u
        assert budget(allocator, avg, u, equal_spend=False) == avg
        assert budget("uniform", avg, u, equal_spend=False) == u
    # W2.5: uniform's 2-bit body would leave the others no choice; they all get 2.5, uniform its floor body
    u = uniform_budget(model, 2.5)
    assert budget(allocator, 2.5, u, equal_spend=True) == 2.5
    assert budget("uniform", 2.5, u, equal_spend=True) == u


def test_the_json_records_the_machine_load(tiny_models, tmp_path):
    model, spec, _ = tiny_models["vit"]
    path = save_checkpoint(tmp_path / "vit.safetensors", model, spec)
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_vit", "--model", str(path), "--settings", "W3A4",
                           "--allocators", "uniform,random", "--seeds", "1", "--calib", "32", "--max-test", "100",
                           "--no-per-tensor", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    loads = [result["load_average_start"], result["load_average_end"], *(r["load_average"] for r in result["runs"])]
    assert len(loads) == 4
    for load in loads:
        assert len(load) == 3 and all(isinstance(x, float) and x >= 0 for x in load)
    # every row keeps its per-image record, whose mean is its top-1; random is paired with uniform on seed 0
    for r in result["runs"]:
        assert r["n_test"] == 100
        assert qv.decode_correct(r["correct"], 100).mean() == pytest.approx(r["top1"])
    u, a = ({r["allocator"]: r for r in result["runs"]}[k] for k in ("uniform", "random"))
    paired = result["paired"]["W3A4/random/channelwise"]
    assert paired["against"] == "uniform" and [s["seed"] for s in paired["per_seed"]] == [0]
    assert paired["per_seed"][0]["diff"] == pytest.approx(a["top1"] - u["top1"])


@pytest.mark.parametrize("b,c,p", [(0, 10, 2 / 1024), (10, 0, 2 / 1024), (5, 5, 1.0), (1, 9, 2 * 11 / 1024),
                                   (0, 0, 1.0), (3, 4, 1.0)])
def test_mcnemar_exact_matches_the_binomial_tail_by_hand(b, c, p):
    # e.g. b=1, c=9: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert qv.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)
    if b + c:
        assert qv.mcnemar_exact_sum(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_sum_agrees_with_scipy_on_larger_counts():
    for b, c in [(40, 62), (100, 100), (7, 30), (250, 180)]:
        assert qv.mcnemar_exact_sum(b, c) == pytest.approx(qv.mcnemar_exact(b, c), rel=1e-9)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 2000])
def test_correct_round_trips_through_hex(n):
    v = np.random.default_rng(n).random(n) < 0.8
    assert np.array_equal(qv.decode_correct(qv.encode_correct(v), n), v)


def test_paired_bootstrap_interval_matches_the_normal_one_on_a_known_sample():
    # 100 images +1, 100 images -1, 800 ties: mean 0, sd sqrt(0.2), standard error sqrt(0.2/1000)
    d = np.array([1] * 100 + [-1] * 100 + [0] * 800)
    lo, hi = qv.paired_bootstrap(d, n_boot=20000, seed=1)
    half = 1.96 * math.sqrt(0.2 / 1000)
    assert lo == pytest.approx(-half, rel=0.08) and hi == pytest.approx(half, rel=0.08)
    # no disagreement at all: the interval collapses onto the difference
    assert qv.paired_bootstrap(np.zeros(50), n_boot=500) == (0.0, 0.0)
    assert qv.paired_bootstrap(np.ones(50), n_boot=500) == (1.0, 1.0)


def _row(allocator, seed, ok, setting="W3A4", channelwise=True):
    return {"setting": setting, "allocator": allocator, "seed": seed, "channelwise": channelwise,
            "n_test": len(ok), "correct": qv.encode_correct(ok)}


def test_paired_summary_counts_discordant_images_per_seed_and_pairs_seeds_over_the_same_images():
    n = 1000
    rng = np.random.default_rng(0)
    u0, u1 = rng.random(n) < 0.8, rng.random(n) < 0.8
    a0 = u0.copy()
    a0[np.flatnonzero(~u0)[:10]] = True  # seed 0: 10 images right only under the allocator
    a1 = u1.copy()
    a1[np.flatnonzero(u1)[:3]] = False  # seed 1: 3 images right only under uniform
    rows = [_row("uniform", 0, u0), _row("uniform", 1, u1), _row("context", 0, a0), _row("context", 1, a1),
            _row("context", 2, a1),  # no uniform row for seed 2: not compared
            _row("context", 0, a0, channelwise=False)]  # no per-tensor uniform: not compared
    out = qv.paired_summary(rows, n_boot=2000)
    assert list(out) == ["W3A4/context/channelwise"]
    e = out["W3A4/context/channelwise"]
    s0, s1 = e["per_seed"]
    assert (s0["seed"], s0["only_allocator_right"], s0["only_reference_right"]) == (0, 10, 0)
    assert s0["diff"] == pytest.approx(0.010) and s0["mcnemar_p"] == pytest.approx(2 / 1024)
    assert s0["ci95"][0] > 0  # every discordant image favours the allocator: the interval excludes 0
    assert (s1["only_allocator_right"], s1["only_reference_right"]) == (0, 3)
    assert s1["diff"] == pytest.approx(-0.003) and s1["mcnemar_p"] == pytest.approx(0.25)
    o = e["over_seeds"]
    assert o["seeds"] == 2 and o["mean_diff"] == pytest.approx(0.0035)
    assert o["ci95"][0] <= 0.0035 <= o["ci95"][1]
    assert (o["seeds_ahead"], o["seeds_ahead_p_below_0.05"], o["seeds_behind_p_below_0.05"]) == (1, 1, 0)


def test_correct_per_image_agrees_with_evaluate():
    from memfit.quant.train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(37, 1, 2, 2), torch.randint(0, 3, (37,))
    ok = qv.correct_per_image(model, x, y, batch_size=10)
    assert ok.shape == (37,) and ok.dtype == bool
    assert ok.mean() == pytest.approx(evaluate(model, x, y))
    pred = model(x).argmax(-1)
    assert np.array_equal(ok, (pred == y).numpy())


def test_repair_recomputes_the_paired_sections_from_a_written_result(tmp_path):
    n = 400
    rng = np.random.default_rng(3)
    u = rng.random(n) < 0.8
    r_ = u.copy()
    r_[np.flatnonzero(~u)[:4]] = True  # random: 4 images more than uniform
    c = r_.copy()
    c[np.flatnonzero(~r_)[:6]] = True  # context: 6 more than random, 10 more than uniform
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"runs": [_row("uniform", 0, u), _row("random", 0, r_), _row("context", 0, c)]}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_vit", "--repair", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(path.read_text())
    assert json.loads(proc.stdout)["paired"] == result["paired"]
    vs_u = result["paired"]["W3A4/context/channelwise"]["per_seed"][0]
    assert (vs_u["only_allocator_right"], vs_u["only_reference_right"]) == (10, 0)
    assert result["paired"]["W3A4/random/channelwise"]["per_seed"][0]["only_allocator_right"] == 4
    assert list(result["paired_vs_random"]) == ["W3A4/context/channelwise"]  # uniform not compared with random
    vs_r = result["paired_vs_random"]["W3A4/context/channelwise"]
    assert vs_r["against"] == "random" and vs_r["per_seed"][0]["only_allocator_right"] == 6
    assert vs_r["per_seed"][0]["mcnemar_p"] == pytest.approx(2 / 64)


def test_model_is_required_without_repair():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_vit", "--settings", "W3A4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--model is required" in proc.stderr


def test_repair_refuses_a_result_without_per_image_records(tmp_path):
    """A result written before the per-image records were kept has nothing to pair: --repair says so and leaves the
    file as it was, instead of writing empty paired sections into it."""
    rows = [{k: v for k, v in _row(a, 0, np.ones(10, bool)).items() if k not in ("correct", "n_test")}
            for a in ("uniform", "context")]
    path = tmp_path / "old.json"
    text = json.dumps({"runs": rows})
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_vit", "--repair", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no per-image records" in proc.stderr and proc.stdout == ""
    assert path.read_text() == text
