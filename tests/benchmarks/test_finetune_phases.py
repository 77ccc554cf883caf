"""benchmarks/finetune_phases: the kernel's peak-RSS mark goes to the phase that reached it, nested calls
included, and what runs after a call is named after it."""
from __future__ import annotations

import types

import pytest

from benchmarks.finetune_phases import PhaseMeter
from memfit.memory.measure import reset_peak_rss

MiB = 2**20


def test_the_peak_goes_to_the_phase_that_reached_it():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak-RSS mark")
    held = []

    def big():  # 64 MiB written (resident), then freed before returning
        b = bytearray(64 * MiB)
        b[:: 4096] = b"\1" * (len(b) // 4096)
        return len(b)

    def outer():  # calls the wrapped functions through the namespace, as the trainer calls wrapped methods
        ns.inner()
        held.append(bytearray(8 * MiB))  # a little after the inner call, in the outer phase
        return ns.big()

    def inner():
        return 1

    ns = types.SimpleNamespace(big=big, outer=outer, inner=inner)
    meter = PhaseMeter()
    meter.wrap(ns, "big", lambda: "big")
    meter.wrap(ns, "inner", lambda: "inner")
    meter.wrap(ns, "outer", lambda: "outer")
    ns.outer()
    meter.close()
    peaks = meter.peaks
    assert meter.order[:2] == ["setup (data, skeleton, pools)", "outer"]
    assert "inner" in peaks and "outer (after inner)" in peaks and "big" in peaks
    assert peaks["big"] - peaks["inner"] >= 60 * MiB
    assert max(peaks, key=peaks.get) == "big"


# ---- --vocab-blocks both / --reps: the side-by-side timing of memascend's vocab_blocks --------------------------

def test_timed_steps_leave_out_the_warm_up_and_the_profiled_last():
    from benchmarks.finetune_phases import timed_steps

    assert timed_steps(1) == [0]  # nothing else to time
    assert timed_steps(2) == [1]
    assert timed_steps(3) == [1]
    assert timed_steps(5) == [1, 2, 3]


def _fake_probe(calls: list):
    """probe(args, vocab_blocks) returning a result whose figures say which variant and rep made it: the head
    takes 2 s with blocks on and 1 s off, plus 0.1 s a rep, and each step 10 s more than its head; the first and
    last steps 100 s more (they are not timed)."""

    def probe(args, vocab_blocks):
        calls.append(vocab_blocks)
        rep = sum(1 for c in calls if c == vocab_blocks) - 1
        head = (2.0 if vocab_blocks else 1.0) + 0.1 * rep
        steps = args.steps
        # the warm-up (step 0) and the last step (profiled) take 100 s more: a median over them would move
        off = [100.0 if s in (0, steps - 1) else 0.0 for s in range(steps)]
        return {"layers": 2, "head": [{"head_seconds": head + o, "head_wait_seconds": 0.5, "embed_forward_seconds": 0.25}
                                      for o in off],
                "step_seconds": [head + 10 + o for o in off], "losses": [1.0] * steps, "pools": {},
                "peak_above_baseline_mib": 1.0, "load_before": [0, 0, 0], "load_after": [0, 0, 0]}
    return probe


def test_both_alternates_the_variants_and_reports_medians(monkeypatch, tmp_path, capsys):
    import json

    import benchmarks.finetune_phases as fp

    calls: list = []
    monkeypatch.setattr(fp, "probe", _fake_probe(calls))
    fp.main(["--vocab-blocks", "both", "--reps", "3", "--steps", "4", "--ssd-dir", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert calls == [True, False, False, True, True, False]  # on-off, off-on, on-off: drift falls on both
    assert out["timed_steps"] == [1, 2] and out["reps"] == 3
    on, off = out["variants"]["on"]["median"], out["variants"]["off"]["median"]
    assert on["head_seconds"] == 2.1 and off["head_seconds"] == 1.1  # medians of reps 0, 1, 2
    assert on["head_with_wait_seconds"] == 2.6 and on["step_seconds"] == 12.1
    assert out["on_over_off"]["head_seconds"] == 2.1 / 1.1
    assert len(out["variants"]["on"]["reps"]) == 3


@pytest.mark.parametrize("argv", [["--vocab-blocks", "on", "--design", "zero-infinity"],
                                  ["--vocab-blocks", "both", "--design", "zero-infinity"],
                                  ["--reps", "0"], ["--steps", "0"]])
def test_bad_options_are_refused_before_anything_runs(argv, monkeypatch, tmp_path):
    import benchmarks.finetune_phases as fp

    calls: list = []
    monkeypatch.setattr(fp, "probe", _fake_probe(calls))
    with pytest.raises(SystemExit) as e:
        fp.main([*argv, "--ssd-dir", str(tmp_path)])
    assert e.value.code == 2 and calls == []


@pytest.mark.parametrize("design,override", [("memascend", False), ("zero-infinity", None), ("zero-infinity", True)])
def test_a_probe_sets_the_flag_for_its_run_only(design, override, monkeypatch, tmp_path):
    """probe(vocab_blocks=...) sets the flag on the design's class while the trainer runs, and puts the class back
    as it was (a class that inherits the flag inherits it again)."""
    import argparse

    import benchmarks.finetune_phases as fp
    from memfit.train.finetune import trainer
    from memfit.train.finetune.designs import make_design

    cls = type(make_design(design))
    before, own = cls.vocab_blocks, "vocab_blocks" in vars(cls)
    seen = []

    class Result:
        def to_json(self):
            return {"host_memory": {"baseline_rss_bytes": 0, "pools": {}}, "losses": [0.0], "step_seconds": [0.0]}

    def fake_run(cfg):
        seen.append(type(make_design(cfg.host_memory)).vocab_blocks)
        return Result()

    monkeypatch.setattr(trainer, "run", fake_run)
    args = argparse.Namespace(threads=1, seed=0, shape="0.1b", layers=1, design=design, steps=1, seq_len=16,
                              ssd_dir=str(tmp_path), data="unused")
    r = fp.probe(args, override)
    assert seen == [before if override is None else override]
    assert r["vocab_blocks"] == seen[0]
    assert cls.vocab_blocks == before and ("vocab_blocks" in vars(cls)) == own
