"""Labelling: an interrupt stops at once (what is stored stays; nothing queued runs on)."""
import time

import pytest

from memfit.plan.cost import families, iree, label, store


def test_interrupt_drops_the_queue(tmp_path, monkeypatch):
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), families.generate(12, seed=2))
    calls = []

    def fake_one(mlir, cfg):
        calls.append(mlir)
        # the first lands at once; the next, started while the interrupt is raised, runs long enough that the
        # cancelling loop is not outrun on a loaded machine (at 50 ms a call a third one had started once)
        time.sleep(0 if len(calls) == 1 else 1.0)
        return "not timed"

    def interrupted(con, futures, version, cpu, bar):
        next(iter(futures)).result()  # one label lands, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(iree, "version", lambda: "test")
    monkeypatch.setattr(label, "_one", fake_one)
    monkeypatch.setattr(label, "_store_as_done", interrupted)
    with pytest.raises(KeyboardInterrupt):
        label.label_all(db, label.LabelConfig(workers=1), progress=False)
    assert len(calls) <= 2  # the one that landed and at most the one already running; 12 were queued
