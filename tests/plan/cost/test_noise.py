"""The noise floor of each label kind, and each kind's error against the quiet real time."""
import json

import pytest

from memfit.plan.cost import noise, store
from memfit.plan.cost.families import generate

from .conftest import needs_iree


def _runs(con, key, runs):
    con.executescript(noise.SCHEMA)
    for rd, (pin, real, cpu, load) in enumerate(runs):
        con.execute("INSERT INTO noise_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, rd, noise.FREE if pin is None else pin, json.dumps(real), json.dumps(cpu), load, 0.0))
    con.commit()


def test_pair_mape_is_one_run_predicting_another():
    # runs 100 and 125: |100-125|/125 = 0.2 and |125-100|/100 = 0.25
    assert noise.pair_mape([[100.0, 125.0]]) == pytest.approx(0.225)
    assert noise.pair_mape([[5.0]]) is None


def test_cpu_time_is_quieter_when_real_time_waits_for_a_core(tmp_path):
    con = store.connect(tmp_path / "d.db")
    # a kernel of 100 us: at load 0.3 real = CPU = 100; under load real time doubles in some repetitions,
    # CPU time moves by 1%
    _runs(con, "k", [(None, [100, 100, 101], [100, 100, 101], 0.3),
                     (None, [200, 190, 210], [101, 100, 102], 6.0),
                     (None, [100, 150, 140], [99, 100, 100], 5.0)])
    s = noise.summary(con, quiet_load=1.0)
    free = s["noise"]["free"]
    assert free["cpu_median"] < 0.02 < 0.3 < free["real_median"]
    q = s["quiet"]
    assert q["runs_judged"] == 2 and q["quiet_load_max"] == 1.0
    # against the quiet real time (100): CPU medians 101 and 100, real medians 200 and 140
    assert q["mape"]["cpu_median"] == pytest.approx(0.005)
    assert q["mape"]["real_median"] == pytest.approx(0.7)
    assert q["median_ratio"]["real_median"] == pytest.approx(1.7)
    # repetitions whose real time is their CPU time (within 2%): 100, 100, 101 of the quiet run, 100 of the
    # third; their median real time (100) is the reference: the CPU medians 100, 101, 100 against it
    u = s["undisturbed"]
    assert u["kernels"] == 1 and u["mape"]["cpu_median"] == pytest.approx(0.01 / 3)
    assert u["median_ratio"]["real_median"] == pytest.approx(1.4)


def test_floor_reports_the_files_own_kind(tmp_path):
    con = store.connect(tmp_path / "d.db")
    store.set_meta(con, label_kind="cpu_min", pin_cpu=None)
    _runs(con, "k", [(None, [100.0], [100.0], 1.0), (None, [130.0], [90.0], 1.0), (0, [100.0], [50.0], 1.0)])
    f = noise.floor(con)
    assert f["label_kind"] == "cpu_min" and f["pinning"] == "free"
    assert f["noise_mape"] == pytest.approx((10 / 90 + 10 / 100) / 2)
    assert set(f["by_kind"]) == {"free", "pinned_cpu0"}


def test_floor_of_an_older_file_reads_its_real_time_table(tmp_path):
    con = store.connect(tmp_path / "d.db")
    con.executemany("INSERT INTO noise VALUES (?, ?, ?)", [("k", 0, 100.0), ("k", 1, 125.0)])
    f = noise.floor(con)
    assert f["label_kind"] == "real_median" and f["noise_mape"] == pytest.approx(0.225)


@needs_iree
def test_remeasure_times_each_kernel_per_pinning_and_resumes(tmp_path):
    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = [s for s in generate(40, seed=1) if s.family == "elementwise"][:1]
    store.add_kernels(con, specs)
    out = noise.remeasure(db, n_kernels=5, rounds=2, pins=(None, 0), progress=False)
    assert out["kernels"] == 1
    rows = con.execute("SELECT pin, real, cpu FROM noise_runs").fetchall()
    assert sorted(r["pin"] for r in rows) == [noise.FREE, noise.FREE, 0, 0]
    assert all(len(json.loads(r["real"])) == 5 == len(json.loads(r["cpu"])) for r in rows)
    noise.remeasure(db, n_kernels=5, rounds=2, pins=(None, 0), progress=False)  # all there: nothing new
    assert con.execute("SELECT COUNT(*) FROM noise_runs").fetchone()[0] == 4
