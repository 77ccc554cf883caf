"""benchmarks/quant_vit.py: the budgets each allocator gets, and the machine's load recorded in its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
                           "--allocators", "uniform", "--seeds", "1", "--calib", "32", "--max-test", "100",
                           "--no-per-tensor", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    loads = [result["load_average_start"], result["load_average_end"], *(r["load_average"] for r in result["runs"])]
    assert len(loads) == 3
    for load in loads:
        assert len(load) == 3 and all(isinstance(x, float) and x >= 0 for x in load)
