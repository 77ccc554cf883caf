"""Labelling: an interrupt stops at once (what is stored stays; nothing queued runs on)."""
import time

import pytest

from memfit.plan.cost import families, iree, label, store
from memfit.plan.cost.errors import CompileError, HarnessError, IreeMissingError


class _InterruptingBar:
    """A progress bar whose first update raises Ctrl-C: one kernel has landed (and, timing, been stored)."""

    def update(self, n):
        raise KeyboardInterrupt

    def close(self):
        pass


@pytest.mark.parametrize("compile_only", [False, True])
def test_interrupt_drops_the_queue(tmp_path, monkeypatch, compile_only):
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), families.generate(12, seed=2))
    calls = []

    def slow_call(mlir):
        calls.append(mlir)
        # the first lands at once; the next, started while the interrupt is raised, runs long enough that the
        # cancelling loop is not outrun on a loaded machine (at 50 ms a call a third one had started once)
        time.sleep(0 if len(calls) == 1 else 1.0)
        return "not timed"

    class FakeStore:
        def __init__(self, root):
            pass

        def compile(self, mlir):
            return slow_call(mlir)

    monkeypatch.setattr(iree, "version", lambda: "test")
    monkeypatch.setattr(label, "_one", lambda mlir, cfg: slow_call(mlir))
    monkeypatch.setattr(label, "CompiledStore", FakeStore)
    monkeypatch.setattr(label, "_bar", lambda total, enabled: _InterruptingBar())
    cfg = label.LabelConfig(workers=1, compile_only=compile_only, compiled_dir=str(tmp_path / "mods"))
    with pytest.raises(KeyboardInterrupt):
        label.label_all(db, cfg, progress=False)
    assert len(calls) <= 2  # the one that landed and at most the one already running; 12 were queued
    # timing stored the label that landed before the interrupt (the fake's "not timed", kept as an error);
    # compiling stores no label
    assert store.counts(store.connect(db))["failed"] == (0 if compile_only else 1)


@pytest.mark.parametrize("error", [HarnessError("could not run the benchmark under taskset -c 999: taskset: ..."),
                                   IreeMissingError("iree-benchmark-module")])
def test_a_harness_failure_stops_the_run_and_stores_nothing(error, tmp_path, monkeypatch):
    """taskset's refusal was stored as each kernel's label (stored failures are never retried): the machine's fault
    is raised instead, the queue dropped, and every kernel stays to label."""
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), families.generate(6, seed=2))
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise error

    monkeypatch.setattr(iree, "version", lambda: "test")
    monkeypatch.setattr(label, "measure", failing)
    with pytest.raises(type(error)):
        label.label_all(db, label.LabelConfig(pin_cpu=999), progress=False)
    counts = store.counts(store.connect(db))
    assert counts["labelled"] == 0 and counts["failed"] == 0 and len(calls) <= 2


def test_a_kernel_that_does_not_compile_is_still_stored_as_failed(tmp_path, monkeypatch):
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), families.generate(3, seed=2))
    monkeypatch.setattr(iree, "version", lambda: "test")
    monkeypatch.setattr(label, "measure", lambda *a, **k: (_ for _ in ()).throw(CompileError("iree-compile failed")))
    label.label_all(db, label.LabelConfig(), progress=False)
    assert store.counts(store.connect(db))["failed"] == 3
