"""`memfit train local`: JSON out, plot, and clear errors without tracebacks."""
import json

import pytest

from memfit.cli import main


def test_single_method_prints_required_fields(capsys):
    rc = main(["train", "local", "--dataset", "digits", "--method", "tpsgd", "--epochs", "1",
               "--batch-size", "64", "--threads", "1", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("method", "model", "depth", "width", "test_accuracy", "train_seconds", "peak_overhead_bytes",
                "peak_training_bytes", "peak_rss_bytes", "epochs"):
        assert key in out
    assert out["method"] == "tpsgd" and out["model"] == "mlp" and out["epochs"] == 1
    assert 0.0 <= out["test_accuracy"] <= 1.0
    assert out["peak_training_bytes"] > out["peak_overhead_bytes"] > 0
    # the allocator's own count of one step: at least one layer's float32 activations for the batch
    assert out["allocator_peak_bytes"] >= 64 * out["width"] * 4


def test_several_methods_and_plot(capsys, tmp_path):
    png = tmp_path / "curves.png"
    rc = main(["train", "local", "--dataset", "digits", "--method", "tpsgd,bp", "--epochs", "1",
               "--max-train", "200", "--plot", str(png), "--threads", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in out["runs"]] == ["tpsgd", "bp"]
    assert set(out["summary"]) == {"tpsgd", "bp"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["--model", "transformer"], "unknown model"),
    (["--dataset", "cifar"], "unknown dataset"),
    (["--depth", "0"], "--depth must be positive"),
    (["--width", "-3"], "--width must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--method", "tpsgd,hebb"], "unknown method hebb"),
    (["--target-scale", "0"], "--target-scale must be positive"),
    (["--time-weighting", "backwards"], "unknown time weighting"),
    (["--rnn-window", "0"], "--rnn-window must be at least 1"),
    (["--model", "rnn", "--rnn-credit", "leak"], "--time-weighting last"),
    (["--rnn-credit", "sideways"], "unknown rnn credit"),
    (["--model", "cnn", "--conv-grid", "0"], "--conv-grid must be at least 1"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install -y dataset-fashion-mnist"),
])
def test_bad_input_is_a_message_and_nonzero_exit(capsys, argv, needle):
    rc = main(["train", "local", "--dataset", "digits", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert needle in err and "Traceback" not in err


def test_recurrent_options_reach_the_trainer(capsys):
    rc = main(["train", "local", "--dataset", "digits", "--model", "rnn", "--method", "tpsgd", "--epochs", "1",
               "--max-train", "200", "--rnn-window", "4", "--time-weighting", "linear", "--target-scale", "2",
               "--no-fused", "--threads", "1", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    s = out["settings"]
    assert (s["rnn_window"], s["time_weighting"], s["target_scale"], s["fused_local"]) == (4, "linear", 2.0, False)
    assert 0.0 <= out["test_accuracy"] <= 1.0


def test_leak_credit_runs_from_the_cli(capsys):
    rc = main(["train", "local", "--dataset", "digits", "--model", "rnn", "--method", "tpsgd,dfa", "--epochs", "1",
               "--max-train", "200", "--rnn-credit", "leak", "--time-weighting", "last", "--threads", "1",
               "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["settings"]["rnn_credit"] for r in out["runs"]] == ["leak", "leak"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in out["runs"])


@pytest.mark.parametrize("plot", ["afile/curves.png", "curves.txt"])
def test_a_plot_path_that_cannot_be_written_is_refused_before_training(capsys, tmp_path, monkeypatch, plot):
    """--plot under a file, or in a format matplotlib cannot write, was a traceback after the whole training."""
    import memfit.train.local.trainer as trainer

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained before checking --plot"))
    rc = main(["train", "local", "--dataset", "digits", "--no-progress", "--json", "--plot", str(tmp_path / plot)])
    out, err = capsys.readouterr()
    assert rc == 2 and "--plot" in json.loads(out)["error"] and "Traceback" not in err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    import memfit.train.local.trainer as trainer

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupt)
    rc = main(["train", "local", "--dataset", "digits", "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 130 and json.loads(out) == {"error": "interrupted"} and err.strip() == "interrupted"


def test_a_model_too_large_to_allocate_is_one_error(capsys, monkeypatch):
    """--width 100000000 was torch's 'can't allocate memory' RuntimeError traceback (other RuntimeErrors still
    propagate: they are bugs, not input)."""
    import memfit.train.local.trainer as trainer

    def too_large(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer, "train", too_large)
    assert main(["train", "local", "--dataset", "digits", "--no-progress", "--json"]) == 2
    out, err = capsys.readouterr()
    assert "lower --width" in json.loads(out)["error"] and "Traceback" not in err

    def bug(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "local", "--dataset", "digits", "--no-progress"])


def test_stderr_to_a_file_gets_the_summary_line_and_no_blank_one(capsys, monkeypatch):
    """With the bar on (no --no-progress) and stderr not a terminal, rich drew nothing and left a blank line."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    assert main(["train", "local", "--dataset", "digits", "--method", "tpsgd", "--epochs", "1", "--batch-size", "64",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("tpsgd: test accuracy") and all(line.strip() for line in err.splitlines()), repr(err)


def test_the_json_help_says_what_a_refusal_prints(capsys):
    """The help said a refusal is always one JSON object on stdout; without --json it prints nothing there."""
    with pytest.raises(SystemExit):
        main(["train", "local", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "so is a refusal" not in text
    assert "without it a refusal is only its message on stderr" in text
    assert main(["train", "local", "--method", "hebb", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown method hebb" in err
    assert main(["train", "local", "--method", "hebb", "--no-progress", "--json"]) == 2
    assert "unknown method hebb" in json.loads(capsys.readouterr().out)["error"]
