"""`memfit train finetune --device`: a device that is not there is one line and exit 2, not torch's traceback."""
from __future__ import annotations

import json

import pytest
import torch

from memfit.cli import main as memfit_main


@pytest.mark.parametrize("device, words", [("cuda", "no CUDA device is usable here"),
                                           ("cuda:1", "no CUDA device is usable here"),
                                           ("tpu", "auto, cpu, cuda or cuda:N")])
def test_finetune_refuses_a_missing_or_unknown_device(device, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    rc = memfit_main(["train", "finetune", "--model", "memfit-tiny", "--data", str(data), "--steps", "1",
                      "--device", device, "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_refused_finetune_with_json_prints_one_error_object(tmp_path, capsys):
    """With --json a refusal is also the one JSON object on stdout ({"error": ...}), as the other commands print."""
    import json

    rc = memfit_main(["train", "finetune", "--model", "memfit-tiny", "--data", str(tmp_path / "nope.jsonl"),
                      "--steps", "1", "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 2
    body = json.loads(out)
    assert set(body) == {"error"} and body["error"] and body["error"] in err and "Traceback" not in err


def _chat(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    return data


def _finetune(tmp_path, *extra, model="memfit-tiny"):
    return memfit_main(["train", "finetune", "--model", str(model), "--data", str(_chat(tmp_path)), "--steps", "1",
                        "--seq-len", "32", "--threads", "1", "--no-progress", "--json", *extra])


def _one_error(capsys, *words):
    import json

    out, err = capsys.readouterr()
    body = json.loads(out)
    assert set(body) == {"error"} and all(w in body["error"] for w in words), body
    assert "Traceback" not in err


@pytest.mark.parametrize("extra, words", [(["--lr", "nan"], ["--lr"]), (["--lr", "inf"], ["--lr"]),
                                          (["--weight-decay", "-1"], ["--weight-decay"]),
                                          (["--threads", "0"], ["--threads"]),
                                          (["--prefetch", "-1"], ["--prefetch", "-1"])])
def test_bad_numbers_are_refused_not_taken(extra, words, tmp_path, capsys):
    """--lr nan, a negative --weight-decay and --threads 0 ran (nan made every weight NaN; threads became 1);
    --prefetch -1 was refused with a message naming --save-every."""
    assert _finetune(tmp_path, *extra) == 2
    _one_error(capsys, *words)


@pytest.mark.parametrize("plot", ["afile/loss.png", "loss.txt"])
def test_a_plot_path_that_cannot_be_written_is_refused_before_training(plot, tmp_path, capsys, monkeypatch):
    """--plot under a file, or in a format matplotlib does not write, was a traceback after the whole run."""
    import memfit.train.finetune.trainer as trainer

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("trained before checking --plot"))
    assert _finetune(tmp_path, "--plot", str(tmp_path / plot)) == 2
    _one_error(capsys, "--plot")


@pytest.mark.parametrize("option", [["--offload", "ssd", "--ssd-dir"], ["--save"]])
def test_a_folder_that_cannot_be_made_is_one_error(option, tmp_path, capsys):
    """--ssd-dir or --save under a file was NotADirectoryError's traceback."""
    (tmp_path / "afile").write_text("")
    assert _finetune(tmp_path, *option, str(tmp_path / "afile" / "dir")) == 2
    _one_error(capsys, "afile")


def test_corrupt_model_weights_are_one_error(tmp_path, capsys):
    """A truncated or garbage model.safetensors was safetensors' SafetensorError traceback."""
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "memfit" / "assets" / "models" / "memfit-tiny"
    model = tmp_path / "model"
    shutil.copytree(src, model)
    (model / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
    assert _finetune(tmp_path, model=model) == 2
    _one_error(capsys, "model.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("damage", ["optimizer", "state"])
def test_a_damaged_checkpoint_is_refused_on_resume(damage, tmp_path, capsys):
    """--resume from a checkpoint with a truncated optimizer file was a SafetensorError traceback, and a broken
    trainer_state.json a bare 'Expecting value' message."""
    assert _finetune(tmp_path, "--save", str(tmp_path / "run")) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip()
    if damage == "optimizer":
        opt = sorted(ckpt.glob("optimizer-*.safetensors"))[0]
        opt.write_bytes(opt.read_bytes()[:100])
    else:
        (ckpt / "trainer_state.json").write_text("{")
    assert _finetune(tmp_path, "--steps", "2", "--resume", str(tmp_path / "run")) == 2
    _one_error(capsys, str(ckpt), "without --resume")


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    import memfit.train.finetune.trainer as trainer

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run", interrupt)
    assert _finetune(tmp_path, "--save", str(tmp_path / "run")) == 130
    out, err = capsys.readouterr()  # interrupted before the first checkpoint: nothing to resume from
    assert json.loads(out) == {"error": "interrupted"} and err.strip() == "interrupted"
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "latest").write_text("step-00000001\n")  # a complete checkpoint's marker (checkpoint.py)
    assert _finetune(tmp_path, "--save", str(tmp_path / "run")) == 130
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == err.strip() and f"--resume {tmp_path / 'run'}" in err


@pytest.mark.parametrize("extra, words", [(["--ssd-dir", "swap"], "--ssd-dir needs --offload ssd"),
                                          (["--offload", "host", "--ssd-dir", "swap"], "--ssd-dir needs --offload ssd"),
                                          (["--tier-backend", "simulated"], "--tier-backend needs --placement"),
                                          (["--slow-nodes", "2", "--local-node", "1"],
                                           "--local-node, --slow-nodes needs --placement"),
                                          (["--simulated-cxl", "3"], "--simulated-cxl needs --placement"),
                                          (["--simulated-cxl", "1", "--tier-backend", "auto"],  # given: the defaults
                                           "--tier-backend, --simulated-cxl needs --placement")])
def test_options_that_would_be_ignored_are_refused(extra, words, tmp_path, capsys, monkeypatch):
    """--ssd-dir without --offload ssd, and the tier options without --placement, ran as if not given."""
    import memfit.train.finetune.trainer as trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("ran with an option it ignores"))
    assert _finetune(tmp_path, *extra) == 2
    _one_error(capsys, words)


def test_a_save_path_that_is_a_file_is_named_as_save(tmp_path, capsys):
    """--save FILE was refused as '--plot FILE/loss.png', an option the user had not given."""
    (tmp_path / "afile").write_text("")
    assert _finetune(tmp_path, "--save", str(tmp_path / "afile")) == 2
    _one_error(capsys, "--save", "afile")


@pytest.mark.parametrize("save", ["afile", "afile/run", "afile/sub/run"])
def test_a_save_path_through_a_file_names_the_file_before_training(save, tmp_path, capsys, monkeypatch):
    """With --plot elsewhere (so that its check did not see --save), --save through a file trained first and then
    stopped with the OS's bare '.../afile: File exists' or '.../afile/run: Not a directory'."""
    import memfit.train.finetune.trainer as trainer

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("trained before checking --save"))
    assert _finetune(tmp_path, "--save", str(tmp_path / save), "--plot", str(tmp_path / "loss.png")) == 2
    _one_error(capsys, f"--save {tmp_path / save}: {tmp_path / 'afile'} is a file, not a folder",
               "--save takes a folder")


def test_a_plan_above_the_available_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    """--batch-size 100000 on memfit-tiny planned 145 GiB and ran until the kernel's OOM killer stopped it; without
    --memory-budget the plan is now held against the host memory available (here said to be 1 MiB)."""
    import memfit.train.finetune.trainer as trainer

    monkeypatch.setattr(trainer, "available_memory", lambda: 2**20)
    assert _finetune(tmp_path) == 2
    _one_error(capsys, "available now", "activations (estimate)")
    assert _finetune(tmp_path, "--memory-budget", "8GiB") == 0  # a budget the user chose is planned for as given


def test_a_tiny_runs_stderr_has_no_profiler_lines(tmp_path):
    """The last step's allocator meter (torch's profiler) printed libkineto's 'USDT:<date> <pid>:<tid>
    SyncActivityProfilerHandler.cpp:39] profiler_start' and '...profiler_stop' on stderr: KINETO_LOG_LEVEL 5 no
    longer silenced torch 2.14's kineto, whose USDT severity is 5. A subprocess: the level is read once a process.
    The progress bar, on a stderr that is not a terminal, left a blank line."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "memfit.cli", "train", "finetune", "--model", "memfit-tiny",
                           "--data", str(_chat(tmp_path)), "--steps", "2", "--seq-len", "32", "--threads", "1",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["losses"]) == 2
    # libkineto's (and glog's) line shape: SEVERITY:date time pid:tid file.cpp:line] message
    native = [line for line in done.stderr.splitlines() if re.search(r"\S+\.(cpp|cc|h):\d+\]", line)]
    assert not native and "profiler_" not in done.stderr, done.stderr
    assert all(line.strip() for line in done.stderr.splitlines()), repr(done.stderr)


@pytest.mark.parametrize("budget, planned", [("0.5", 4 * 2**30), ("50%", 4 * 2**30), ("2GiB", 2 * 2**30),
                                             ("4096", 4096)])
def test_memory_budget_takes_a_fraction_as_the_other_commands_do(budget, planned, tmp_path, capsys, monkeypatch):
    """--memory-budget 0.5 was read as 0 bytes and 1.5 as 1 byte, 50% was 'not a byte size', where every other
    command's --memory-budget takes a share of the available memory (memory.budget.parse_budget)."""
    import memfit.memory.budget as budget_mod
    import memfit.train.finetune.trainer as trainer

    seen = []

    def fake_run(cfg, progress=None):
        seen.append(cfg.memory_budget)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(budget_mod, "available_memory", lambda *a, **k: 8 * 2**30)
    monkeypatch.setattr(trainer, "run", fake_run)
    assert _finetune(tmp_path, "--memory-budget", budget) == 2
    assert seen == [planned]
    _one_error(capsys, "stopped by the test")


@pytest.mark.parametrize("budget, words", [("1.5", "fraction must be in (0, 1]"), ("0", "must be positive"),
                                           ("lots", "not a byte size")])
def test_a_memory_budget_that_is_neither_is_refused(budget, words, tmp_path, capsys, monkeypatch):
    import memfit.train.finetune.trainer as trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("ran with a bad --memory-budget"))
    assert _finetune(tmp_path, "--memory-budget", budget) == 2
    _one_error(capsys, "--memory-budget", words)


def test_a_memory_budget_past_the_machines_memory_is_warned_about_and_kept(tmp_path, capsys, monkeypatch):
    """--memory-budget 1000TiB was taken silently, a budget that can never be what stops the run: now a warning on
    stderr names the option, the value and the machine's memory; the run still gets the budget as given."""
    import memfit.train.finetune.trainer as trainer

    seen = []

    def fake_run(cfg, progress=None):
        seen.append(cfg.memory_budget)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(trainer, "run", fake_run)
    assert _finetune(tmp_path, "--memory-budget", "1000TiB") == 2
    assert seen == [1000 * 2**40]
    err = capsys.readouterr().err
    assert "memfit train finetune: warning: --memory-budget 1000TiB (1000.00 TiB) is more than this machine's " \
           "memory" in err and "in all" in err
    assert _finetune(tmp_path, "--memory-budget", "64MiB") == 2
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("save, words", [("/proc/x", "--save /proc/x: cannot create the folder /proc/x"),
                                         ("/proc", "--save /proc: cannot write in /proc")])
def test_a_save_folder_that_cannot_be_made_or_written_is_refused_before_training(save, words, tmp_path, capsys,
                                                                                monkeypatch):
    """Only a --save through a file was refused: /proc/x (or a read-only folder) trained fully and then failed at
    the first checkpoint. --plot elsewhere, so that its check does not see --save."""
    import memfit.train.finetune.trainer as trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("trained before checking --save"))
    assert _finetune(tmp_path, "--save", save, "--plot", str(tmp_path / "loss.png")) == 2
    _one_error(capsys, words)


def test_the_save_check_leaves_no_folder_behind_a_run_that_writes_none(tmp_path, capsys, monkeypatch):
    """The folder is the first checkpoint's to make: a run refused before it (here by the trainer) leaves none."""
    import memfit.train.finetune.trainer as trainer

    def refused(cfg, progress=None):
        assert not (tmp_path / "runs").exists()
        raise ValueError("stopped by the test")

    monkeypatch.setattr(trainer, "run", refused)
    assert _finetune(tmp_path, "--save", str(tmp_path / "runs" / "a")) == 2
    _one_error(capsys, "stopped by the test")
    assert not (tmp_path / "runs").exists()
