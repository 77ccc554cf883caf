"""oneDNN's per-kernel size (engine/onednn_kernels.py): measured in fresh processes, cached per machine and build,
never cached when the measurement fails or is implausible; the shape-cache term uses it; the cache file keeps
every entry when processes write it at once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.llm.engine import calibration_cache, fallback_accounting, onednn_kernels
from memfit.llm.models.config import ModelConfig
from memfit.llm.models.loader import resolve_model_path
from memfit.llm.models.packing import ROW_BUCKETS, can_pack_for_cpu, row_shapes

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(onednn_kernels, "_memo", None)
    return tmp_path


def _draws(monkeypatch, values):
    calls = []

    def draw():
        calls.append(1)
        v = values[len(calls) - 1]
        if isinstance(v, Exception):
            raise v
        return v

    monkeypatch.setattr(onednn_kernels, "_draw", draw)
    return calls


def test_the_most_of_three_draws_is_cached_and_read_back(fresh, monkeypatch):
    calls = _draws(monkeypatch, [600_000, 621_430, 610_000])
    assert onednn_kernels.kernel_bytes() == 622_592  # 621,430 rounded up to 4 KiB
    assert len(calls) == 3
    monkeypatch.setattr(onednn_kernels, "_memo", None)
    calls = _draws(monkeypatch, [RuntimeError("must not run")])
    assert onednn_kernels.kernel_bytes() == 622_592 and not calls  # from the cache file
    entries = [v for k, v in calibration_cache.read_cache().items() if k.startswith("onednn-kernel|")]
    assert entries == [{"kernel_bytes": 622_592, "draws": [600_000, 621_430, 610_000]}]
    cfg = ModelConfig.from_dir(resolve_model_path("memfit-tiny"))
    assert fallback_accounting.shape_cache_bytes(cfg, "onednn", 512) == 5 * len(ROW_BUCKETS) * 622_592
    assert fallback_accounting.shape_cache_bytes(cfg, "blocked", 512) == 0


@pytest.mark.parametrize("draws", [[RuntimeError("killed"), 1, 1], [600_000, 0, 600_000]])
def test_a_failed_or_implausible_measurement_counts_the_constant_and_is_not_cached(fresh, monkeypatch, draws):
    _draws(monkeypatch, draws)
    assert onednn_kernels.kernel_bytes() == onednn_kernels.FALLBACK_BYTES
    assert not any(k.startswith("onednn-kernel|") for k in calibration_cache.read_cache())
    calls = _draws(monkeypatch, [500_000, 500_000, 500_000])  # the next process tries again
    assert onednn_kernels.kernel_bytes() == 503_808 and len(calls) == 3


def test_without_measuring_it_reads_the_cache_or_counts_the_constant(fresh, monkeypatch):
    calls = _draws(monkeypatch, [RuntimeError("must not run")])
    assert onednn_kernels.kernel_bytes(measure=False) == onednn_kernels.FALLBACK_BYTES and not calls


@pytest.mark.skipif(not can_pack_for_cpu(torch.float32), reason="no oneDNN linear packing here")
def test_a_real_measurement_counts_every_bucket_of_every_matrix():
    out = subprocess.run([sys.executable, "-m", "memfit.llm.engine.onednn_kernels", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["kernels"] == 5 * (row_shapes(10**6) - 1) and len(r["by_matrix"]) == 5
    # a kernel is hundreds of KiB (510-700 on the Intel host, ~575-620 on an AMD Zen 4): a count of nothing, or of
    # the activations too, would fall outside
    assert all(128 * 1024 <= v <= 2 * 2**20 for v in r["by_matrix"].values()), r
    assert r["kernel_bytes"] == max(r["by_matrix"].values())


def _write_entries(cache_dir: str, worker: int) -> None:
    import os

    os.environ["MEMFIT_CACHE"] = cache_dir
    for j in range(20):
        calibration_cache.write_cache_entry(f"k{worker}-{j}", {"v": j})


def test_processes_writing_the_cache_at_once_keep_every_entry(tmp_path, monkeypatch):
    """A server and a `memfit fit` may calibrate at the same time: 4 processes x 20 entries, none lost (without the
    lock, 26 of 80 were left)."""
    import multiprocessing

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_entries, args=(str(tmp_path), i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(calibration_cache.read_cache()) == sorted(f"k{i}-{j}" for i in range(4) for j in range(20))
