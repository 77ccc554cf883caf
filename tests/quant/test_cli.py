"""`memfit quant` commands: bad input refused before the work, one JSON object under --json, progress on stderr."""
from __future__ import annotations

import json

import pytest

from memfit.cli import main


def _fail(*a, **k):
    pytest.fail("the work started before the options were checked")


@pytest.mark.parametrize("argv", [
    ["vit", "--model", "m.safetensors", "--plot", "afile/bits.png"],
    ["vit", "--model", "m.safetensors", "--plot", "bits.txt"],
    ["export", "--model", "m.safetensors", "--out", "afile/w3.safetensors"],
    ["train-vit", "--tiny", "--out", "afile/vit.safetensors"],
])
def test_outputs_that_cannot_be_written_are_refused_before_the_work(argv, tmp_path, capsys, monkeypatch):
    """--plot/--out under a file (or a plot suffix matplotlib cannot write) were a traceback after the
    quantization or the whole training, its result lost."""
    import memfit.quant.pipeline as pipeline
    import memfit.quant.train as train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(pipeline, "run_quant", _fail)
    monkeypatch.setattr(train, "train_vit", _fail)
    assert main(["quant", *argv, "--json", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert ("--plot" if "--plot" in argv else "--out") in json.loads(out)["error"] and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--avg-bits", "--avg-act-bits"])
def test_nan_bit_budgets_are_refused(flag, capsys):
    """--avg-bits nan compared false with every bound and quantized every layer at 8 bits."""
    assert main(["quant", "vit", "--model", "missing.safetensors", flag, "nan", "--json", "--no-progress"]) == 2
    assert flag in json.loads(capsys.readouterr().out)["error"]


def test_quant_vit_reports_each_stage_to_the_progress_bar(tiny_models, fmnist_small, tmp_path, monkeypatch):
    """quant vit and export ran for minutes on a real ViT with nothing on stderr."""
    import memfit.quant.pipeline as pipeline
    from memfit.quant.checkpoint import save_checkpoint
    from memfit.quant.pipeline import QuantRun, run_quant

    model, spec, _ = tiny_models["vit"]
    path = save_checkpoint(tmp_path / "vit.safetensors", model, spec)
    seen = []
    run_quant(QuantRun(model=str(path), act_bits=4, calib=16, max_test=20), fmnist_small,
              progress=lambda label, done, total: seen.append((label.split(" (")[0], done, total)))
    assert [s[0] for s in seen] == ["allocating bits", "quantizing", "evaluating packed", "evaluating simulated",
                                    "evaluating fp32", "timing"]
    assert [s[1] for s in seen] == list(range(6)) and {s[2] for s in seen} == {6}
    given = []
    monkeypatch.setattr(pipeline, "run_quant", lambda cfg, progress=None: given.append(progress) or _fail())
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # the bar is drawn on a terminal only: make the captured stderr one
    with pytest.raises(pytest.fail.Exception):
        main(["quant", "vit", "--model", str(path)])
    assert callable(given[0])


@pytest.mark.parametrize("flags, words", [(["--avg-bits", "100"], "--avg-bits 100 is above 8"),
                                          (["--avg-bits", "8.5"], "--avg-bits 8.5 is above 8"),
                                          (["--avg-act-bits", "9"], "--avg-act-bits 9 is above 8"),
                                          (["--act-bits", "5"], "--act-bits 5 is not supported"),
                                          (["--act-bits", "16"], "--act-bits 16 is not supported")])
def test_bit_widths_past_the_widest_are_refused(flags, words, capsys):
    """--avg-bits 100 (or anything above 8, the widest width) was taken and quantized every layer at 8 bits."""
    assert main(["quant", "vit", "--model", "missing.safetensors", *flags, "--json", "--no-progress"]) == 2
    assert words in json.loads(capsys.readouterr().out)["error"]


def test_max_test_past_the_test_set_is_refused(tiny_models, fmnist_small, tmp_path):
    """--max-test 20000 sliced past the end of the 10k test images and evaluated on all of them without a word."""
    from memfit.quant.checkpoint import save_checkpoint
    from memfit.quant.errors import QuantError
    from memfit.quant.pipeline import QuantRun, run_quant

    model, spec, _ = tiny_models["vit"]
    path = save_checkpoint(tmp_path / "vit.safetensors", model, spec)
    n = len(fmnist_small.y_test)
    with pytest.raises(QuantError, match=f"--max-test {n + 1} is larger than the {n} test images"):
        run_quant(QuantRun(model=str(path), act_bits=4, calib=16, max_test=n + 1), fmnist_small)


def test_max_train_past_the_training_set_is_refused(fmnist_small):
    """--max-train past the training set took all of it without a word (--max-test is refused the same way)."""
    from memfit.quant.errors import QuantError
    from memfit.quant.train import TrainViTConfig, train_vit

    n = len(fmnist_small.y_train)
    with pytest.raises(QuantError, match=f"--max-train {n + 1} is larger than the {n} training images"):
        train_vit(TrainViTConfig(arch="vit", epochs=1, tiny=True, max_train=n + 1), fmnist_small)


@pytest.mark.parametrize("terminal", [False, True])
def test_the_bar_is_started_on_a_terminal_only(terminal, capsys, monkeypatch):
    """To a file or pipe rich's bar drew nothing and left one blank line on stderr (`quant train-vit ... 2>log`)."""
    from memfit.quant.cli import _progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1" if terminal else "0")
    with _progress(True, "quantizing") as update:
        assert callable(update) == terminal
    assert (capsys.readouterr().err == "") != terminal


@pytest.mark.parametrize("argv, words", [
    (["vit", "--model", "m.safetensors", "--act-bits", "4", "--seed", str(2**64)], "--seed must be within"),
    (["train-vit", "--tiny", "--out", "v.safetensors", "--seed", str(2**70)], "--seed must be within"),
    (["train-vit", "--tiny", "--out", "v.safetensors", "--lr", "inf"], "--lr must be a positive finite number"),
])
def test_seeds_past_64_bits_and_an_infinite_lr_are_refused_before_the_work(argv, words, tmp_path, capsys,
                                                                           monkeypatch):
    """--seed 2^64 was torch's 'Overflow when unpacking long long'; train-vit --lr inf trained to NaN."""
    import memfit.quant.checkpoint as checkpoint
    import memfit.quant.train as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "load_checkpoint", _fail)
    monkeypatch.setattr(train, "train_vit", _fail)
    assert main(["quant", *argv, "--json", "--no-progress"]) == 2
    assert words in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize("argv", [
    ["export", "--model", "q/src.safetensors", "--out", "q/src.safetensors"],
    ["export", "--model", "q/src.safetensors", "--out", "q/../q/src.safetensors"],
    ["export", "--model", "q/src.safetensors", "--out", "link.safetensors"],
    ["train-vit", "--arch", "deit", "--tiny", "--teacher", "q/src.safetensors", "--out", "./q/src.safetensors"],
])
def test_an_out_that_is_the_input_checkpoint_is_refused_before_the_work(argv, tmp_path, capsys, monkeypatch):
    """export --out onto its --model exited 0 with the fp32 checkpoint replaced by the packed file."""
    import memfit.quant.pipeline as pipeline
    import memfit.quant.train as train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").mkdir()
    src = tmp_path / "q" / "src.safetensors"
    src.write_bytes(b"the user's fp32 checkpoint")
    (tmp_path / "link.safetensors").symlink_to(src)
    monkeypatch.setattr(pipeline, "run_quant", _fail)
    monkeypatch.setattr(train, "train_vit", _fail)
    assert main(["quant", *argv, "--json", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "is the same file as --" in json.loads(out)["error"] and "Traceback" not in err
    assert src.read_bytes() == b"the user's fp32 checkpoint"
