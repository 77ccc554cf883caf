"""`memfit fit`: a context past the model's positions is predicted but said to be one the engine will not run."""
from __future__ import annotations

import json

from memfit.cli import main as memfit_main


def test_a_context_past_the_models_positions_is_warned_about(capsys):
    assert memfit_main(["fit", "--context", "4096", "--batch", "1", "--no-runtime", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["context"] == 4096  # still one JSON object on stdout
    assert "past the model's 2048 positions" in out.err
    assert memfit_main(["fit", "--context", "2048", "--batch", "1", "--no-runtime", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_tensor_parallel_size_below_one_is_refused(capsys):
    """--tensor-parallel-size 0 (or -3) printed the one-process breakdown as if nothing were wrong."""
    import pytest

    for size in ("0", "-3"):
        assert memfit_main(["fit", "--tensor-parallel-size", size, "--no-runtime", "--json"]) == 2
        out = capsys.readouterr()
        assert json.loads(out.out) == {"error": f"--tensor-parallel-size must be at least 1 (got {size})"}
    with pytest.raises(ValueError, match="at least 1"):
        from memfit.llm.engine.fit import predict_for_engine

        predict_for_engine("memfit-tiny", 64, 1, tensor_parallel_size=0, measure_runtime=False)


def test_speculation_figures_out_of_range_or_without_a_draft_are_refused(capsys):
    """--draft-cost -1 was a ZeroDivisionError traceback; --acceptance 2 predicted an impossible speed-up; the
    speculation options without --speculative-model were ignored."""
    spec = ["--speculative-model", "self:1", "--acceptance", "0.5", "--draft-cost", "0.3", "--verify-cost", "1.1"]
    cases = [(["--speculative-model", "self:1", "--acceptance", "2", "--draft-cost", "0.3", "--verify-cost", "1.1"],
              "--acceptance"),
             (spec[:-1] + ["-1"], "--verify-cost"), (spec[:-3] + ["0", "--verify-cost", "1.1"], "--draft-cost"),
             (["--acceptance", "0.5"], "--acceptance needs --speculative-model"),
             (["--keep-speedup", "0.5"], "--keep-speedup needs --speculative-model"),
             (["--keep-speedup", "0.95"], "--keep-speedup needs --speculative-model")]  # given, though the default
    for flags, words in cases:
        assert memfit_main(["fit", "--no-runtime", "--json", *flags]) == 2, flags
        out = capsys.readouterr()
        assert words in json.loads(out.out)["error"] and "Traceback" not in out.err
