"""benchmarks.costmodel_label_drift: two labellings of the same kernels compared, the second the reference."""
import pytest

from benchmarks.costmodel_label_drift import compare
from memfit.plan.cost import families, store


def _db(path, specs, latencies):
    con = store.connect(path)
    store.add_kernels(con, specs)
    for spec, lat in zip(specs, latencies):
        if lat is not None:
            store.put_label(con, spec.key(), latency_us=lat, spread=0.01, reps=[lat] * 3,
                            figures={"cpu_reps": [lat] * 3})
    return str(path)


def test_drift_is_measured_against_the_new_labels(tmp_path):
    specs = families.generate(4, seed=3)
    old = _db(tmp_path / "old.db", specs, [100.0, 200.0, 50.0, 10.0])
    new = _db(tmp_path / "new.db", specs, [100.0, 100.0, 40.0, None])  # the last is not labelled in both
    out = compare(old, new, top=2)
    assert out["all"]["n"] == 3
    # APEs 0, 1.0 (200 against 100), 0.25 (50 against 40)
    assert out["all"]["mape"] == pytest.approx((0 + 1.0 + 0.25) / 3)
    assert out["all"]["median_ape"] == pytest.approx(0.25)
    assert out["all"]["over_30pct"] == 1
    assert [m["old_us"] for m in out["moved_most"]] == [200.0, 50.0]
    assert sum(g["n"] for g in out["by_family_dtype"].values()) == 3


def test_no_common_kernel_is_refused(tmp_path):
    a = _db(tmp_path / "a.db", families.generate(2, seed=1), [1.0, 2.0])
    b = _db(tmp_path / "b.db", families.generate(2, seed=2), [None, None])
    with pytest.raises(SystemExit, match="no kernel"):
        compare(a, b)
