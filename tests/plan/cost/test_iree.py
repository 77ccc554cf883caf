"""Label kinds: which time a label is, read off one benchmark run's repetitions; and a pinned timing."""
import os
import statistics

import pytest

from memfit.plan.cost import iree
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.parse import pick_function

from .conftest import TINY_MATMUL, needs_iree

REAL = [12.0, 30.0, 11.0, 13.0, 25.0]   # real time: two repetitions waited for a core
CPU = [10.5, 10.9, 10.2, 10.4, 11.0]    # the process's CPU time over the same repetitions


def test_each_kind_reads_its_clock_and_statistic():
    assert iree.label_value("real_median", REAL, CPU) == 13.0
    assert iree.label_value("real_min", REAL, CPU) == 11.0
    assert iree.label_value("cpu_median", REAL, CPU) == 10.5
    assert iree.label_value("cpu_min", REAL, CPU) == 10.2
    t = iree.Timing(REAL, CPU)
    assert t.label() == iree.label_value(iree.DEFAULT_LABEL_KIND, REAL, CPU)
    assert t.median_us == statistics.median(REAL)
    assert set(iree.LABEL_KINDS) == {"real_median", "real_min", "cpu_median", "cpu_min"}


def test_unknown_kind_or_missing_clock_is_a_clear_error():
    with pytest.raises(CostModelError, match="unknown label kind 'wall'"):
        iree.label_value("wall", REAL, CPU)
    with pytest.raises(CostModelError, match="no cpu time"):
        iree.label_value("cpu_min", REAL, [])


@needs_iree
def test_pinned_timing_runs_on_the_core_it_is_given(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    vmfb = iree.compile_mlir(TINY_MATMUL, tmp_path, dump=False)
    seen = []
    real_run = subprocess.run

    def spy(cmd, *a, **kw):
        seen.append(list(cmd))
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    core = sorted(os.sched_getaffinity(0))[-1]
    t = iree.benchmark(vmfb, pick_function(TINY_MATMUL), repetitions=3, min_time_s=0.01, pin_cpu=core)
    assert seen[-1][:3] == ["taskset", "-c", str(core)]
    assert len(t.reps_us) == 3 and len(t.cpu_reps_us) == 3 and all(c > 0 for c in t.cpu_reps_us)


@needs_iree
def test_a_cpu_taskset_may_not_use_is_a_harness_error_not_the_kernels(tmp_path):
    """taskset exits before the benchmark starts: its message said the kernel failed, and was stored as its label."""
    import shutil

    from memfit.plan.cost.errors import HarnessError

    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    vmfb = iree.compile_mlir(TINY_MATMUL, tmp_path, dump=False)
    cpu = max(os.sched_getaffinity(0)) + 1  # one this process may not run on
    with pytest.raises(HarnessError, match=f"taskset -c {cpu}"):
        iree.benchmark(vmfb, pick_function(TINY_MATMUL), repetitions=1, min_time_s=0.01, pin_cpu=cpu)
