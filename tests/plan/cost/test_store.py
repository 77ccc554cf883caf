"""The dataset file: a label's kind is recorded, and any other kind can be read off the stored repetitions."""
import json

import pytest

from memfit.plan.cost import store
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.families import generate

REAL = [12.0, 30.0, 11.0, 13.0, 25.0]
CPU = [10.5, 10.9, 10.2, 10.4, 11.0]


def _db(tmp_path, figures, kind=None):
    con = store.connect(tmp_path / "d.db")
    (spec,) = generate(1, seed=3)
    store.add_kernels(con, [spec])
    if kind:
        store.set_meta(con, label_kind=kind)
    store.put_label(con, spec.key(), latency_us=10.5, spread=0.1, reps=REAL, figures=figures)
    return con


def test_kinds_read_off_the_repetitions(tmp_path):
    con = _db(tmp_path, {"cpu_us": 10.5, "cpu_reps": CPU, "instructions": 7}, kind="cpu_median")
    assert store.label_kind(con) == "cpu_median"
    (own,) = store.labelled(con)
    assert own["latency_us"] == 10.5 and "stored_latency_us" not in own
    (real,) = store.labelled(con, "real_median")
    assert real["latency_us"] == 13.0 and real["stored_latency_us"] == 10.5 and real["instructions"] == 7
    assert store.labelled(con, "real_min")[0]["latency_us"] == 11.0
    assert store.labelled(con, "cpu_min")[0]["latency_us"] == 10.2


def test_older_files_hold_real_medians_and_the_cpu_median_only(tmp_path):
    con = _db(tmp_path, {"cpu_us": 10.5})
    assert store.label_kind(con) == "real_median"  # no kind recorded: what labels were before
    assert store.labelled(con, "cpu_median")[0]["latency_us"] == 10.5
    with pytest.raises(CostModelError, match="no cpu time"):
        store.labelled(con, "cpu_min")
    assert json.loads(json.dumps(store.meta(con))) == {}
