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


def _tiny_copy(tmp_path, name="model"):
    import shutil

    from memfit.llm.models.loader import resolve_model_path

    return shutil.copytree(resolve_model_path("memfit-tiny"), tmp_path / name)


def _truncate(d):
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100_000)


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")


def _no_weights(d):
    (d / "model.safetensors").unlink()


def test_weights_every_other_command_refuses_are_refused(tmp_path, capsys):
    """fit read only config.json: a pickle-only or truncated directory got a prediction (exit 0, 8 MiB of weights)
    where generate, chat, bench and serve refuse it."""
    import pytest

    from memfit.llm.models.loader import load_model

    for i, (breaks, words) in enumerate(((_pickle_only, "only pickle checkpoint"),
                                         (_truncate, "not a readable safetensors file"))):
        d = _tiny_copy(tmp_path, f"m{i}")
        breaks(d)
        with pytest.raises(ValueError, match=words.replace("*", r"\*")):  # the loader's own message
            load_model(d)
        for flags in (["--model", str(d)], ["--speculative-model", str(d)]):
            assert memfit_main(["fit", "--context", "64", "--no-runtime", "--json", *flags]) == 2, (words, flags)
            out = capsys.readouterr()
            assert words in json.loads(out.out)["error"] and "Traceback" not in out.err
    assert memfit_main(["fit", "--context", "64", "--no-runtime", "--json", "--model", str(_tiny_copy(tmp_path))]) == 0
    assert json.loads(capsys.readouterr().out)["weights_bytes"] > 0


def test_a_model_without_weights_yet_is_sized_from_its_config_with_a_warning(tmp_path, capsys):
    """"Will it fit?" comes before the download: no weight file at all is a prediction from config.json and a
    warning, the same bytes as with the weights there; --measure, which runs the model, refuses it."""
    whole = _tiny_copy(tmp_path, "whole")
    assert memfit_main(["fit", "--context", "64", "--no-runtime", "--json", "--model", str(whole)]) == 0
    expected = json.loads(capsys.readouterr().out)["weights_bytes"]
    bare = _tiny_copy(tmp_path, "bare")
    _no_weights(bare)
    assert memfit_main(["fit", "--context", "64", "--no-runtime", "--json", "--model", str(bare)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["weights_bytes"] == expected and "has no weight files yet" in out.err
    assert memfit_main(["fit", "--context", "64", "--no-runtime", "--json", "--measure", "--model", str(bare)]) == 2
    assert "has no *.safetensors weights" in json.loads(capsys.readouterr().out)["error"]


def test_measure_reports_the_measuring_runs_refusal_as_its_own(tmp_path, monkeypatch, capsys):
    """A model the measuring process refused was a RuntimeError wrapping that process's traceback; it is one line,
    exit code 2, and under --json the one object {"error": message}. fit's own weight check is skipped here so the
    measuring process is the one that meets the truncated file."""
    from memfit.llm.models import loader

    d = _tiny_copy(tmp_path)
    _truncate(d)
    monkeypatch.setattr(loader, "check_weight_files", lambda path: [])
    assert memfit_main(["fit", "--model", str(d), "--context", "64", "--no-runtime", "--measure", "--json"]) == 2
    out = capsys.readouterr()
    error = json.loads(out.out)["error"]
    assert error.startswith("--measure: the measuring run refused") and "not a readable safetensors file" in error
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


def test_zero_speculative_tokens_is_refused_not_read_as_four(capsys):
    for g in ("0", "-2"):
        assert memfit_main(["fit", "--no-runtime", "--json", "--speculative-model", "memfit-tiny-draft",
                            "--num-speculative-tokens", g, "--acceptance", "0.8", "--draft-cost", "0.1",
                            "--verify-cost", "1.0"]) == 2
        assert json.loads(capsys.readouterr().out) == {"error": f"--num-speculative-tokens must be at least 1, got {g}"}
    assert memfit_main(["fit", "--no-runtime", "--json", "--num-speculative-tokens", "3"]) == 2
    assert "needs --speculative-model" in json.loads(capsys.readouterr().out)["error"]


def test_a_memory_budget_past_the_machines_memory_is_warned_about(capsys):
    """--memory-budget 1000TiB was taken silently; a budget no machine here has is still checked against, with a
    warning on stderr naming the machine's memory (stdout stays one JSON object)."""
    assert memfit_main(["fit", "--memory-budget", "1000TiB", "--no-runtime", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["fits"] is True
    assert "memfit fit: warning: --memory-budget 1000TiB (1000.00 TiB) is more than this machine's memory" in out.err
    assert memfit_main(["fit", "--memory-budget", "64MiB", "--no-runtime", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err
