"""memfit.errors.guard: a user's mistake is one line on stderr and exit 2; with --json also one JSON object on
stdout, {"error": message} (what `memfit plan --json` printed already; the other commands printed nothing)."""
from __future__ import annotations

import argparse
import json

import pytest

from memfit.cli import main
from memfit.errors import guard


def _refuse(args):
    raise ValueError("no such thing")


@pytest.mark.parametrize("as_json", [False, True])
def test_guard_prints_the_error_and_with_json_one_object(as_json, capsys):
    args = argparse.Namespace(command="demo", json=as_json)
    assert guard(_refuse)(args) == 2
    out = capsys.readouterr()
    assert out.err == "memfit demo: error: no such thing\n"
    assert (json.loads(out.out) == {"error": "no such thing"}) if as_json else out.out == ""


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_under_guard_is_one_line_status_130_and_with_json_one_object(as_json, capsys):
    """Ctrl-C exits 130 without a traceback; with --json the output still holds exactly one object."""
    def interrupt(args):
        raise KeyboardInterrupt

    assert guard(interrupt)(argparse.Namespace(command="demo", json=as_json)) == 130
    out = capsys.readouterr()
    assert out.err == "interrupted\n"
    assert (json.loads(out.out) == {"error": "interrupted"}) if as_json else out.out == ""


@pytest.mark.parametrize("argv", [["fit", "--context", "0", "--json"],
                                  ["quant", "vit", "--model", "missing.safetensors", "--json"],
                                  ["costmodel", "predict", "missing.mlir", "--json"]])
def test_refused_json_commands_print_one_error_object(argv, capsys):
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "error" in json.loads(out.out) and "error:" in out.err


@pytest.mark.parametrize("argv", [["fit", "--json", "--context", "abc"], ["generate", "hi", "--json", "--bogus"],
                                  ["train", "local", "--json", "--epochs", "x"]])
def test_a_usage_error_with_json_prints_one_error_object(argv, capsys):
    """argparse's own refusals (a bad value, an unknown option) with --json: the usage on stderr, exit 2, and the one
    JSON object on stdout, as every other refusal."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "usage:" in err
    body = json.loads(out)
    assert set(body) == {"error"} and body["error"] in err


def test_train_local_takes_json_and_refuses_into_it(capsys):
    assert main(["train", "local", "--json", "--method", "bogus"]) == 2
    out, err = capsys.readouterr()
    assert "bogus" in json.loads(out)["error"] and "bogus" in err


def test_same_file_sees_through_spellings_and_links(tmp_path, monkeypatch):
    from memfit.errors import same_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.bin").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    (tmp_path / "hard.bin").hardlink_to(tmp_path / "a.bin")
    for other in ("./a.bin", "sub/../a.bin", str(tmp_path / "a.bin"), "link.bin", "hard.bin"):
        assert same_file("a.bin", other), other
    assert same_file("new.png", "./new.png")  # neither there yet: the resolved paths
    assert not same_file("a.bin", "b.bin") and not same_file("new.png", "new.json")


def test_distinct_output_names_both_options():
    from memfit.errors import distinct_output

    distinct_output(None, "--out", ("--model", "m.safetensors"))  # no output: nothing to check
    distinct_output("o.json", "--out", ("--plot", None), ("--model", "m.onnx"))
    with pytest.raises(ValueError, match=r"--plot ./p\.png is the same file as --out p\.png"):
        distinct_output("./p.png", "--plot", ("--out", "p.png"))


def test_a_budget_past_the_machines_memory_is_a_warning_on_stderr(capsys, monkeypatch):
    """--memory-budget 1000TiB was taken silently: memory runs out long before such a budget, so it never stops
    anything. A warning (not a refusal) names the option, the value and the machine's total memory."""
    import types

    import psutil

    from memfit.errors import warn_budget_past_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=16 * 2**30, available=8 * 2**30))
    args = argparse.Namespace(command="demo", prog="memfit demo", json=True)
    warn_budget_past_memory(args, "--memory-budget", "1000TiB", 1000 * 2**40)
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays for the one --json object
    assert err.startswith("memfit demo: warning: --memory-budget 1000TiB (1000.00 TiB)") and "16.00 GiB in all" in err
    for nbytes in (16 * 2**30, 12 * 2**30):  # the machine's memory or less (past what is available now, too): silent
        warn_budget_past_memory(args, "--memory-budget", "x", nbytes)
        assert capsys.readouterr() == ("", "")


def test_output_dir_refuses_a_folder_that_cannot_be_made_or_written(tmp_path, monkeypatch):
    """--save /proc/x (or a read-only folder) was taken, and the run failed at its first checkpoint, after the
    training; only a path through a file was refused."""
    import errno
    import tempfile

    from memfit.errors import output_dir

    (tmp_path / "afile").write_text("")
    for path in ("afile", "afile/run", "afile/sub/run"):  # the file at the end of the path or on it
        with pytest.raises(ValueError, match=f"--save {tmp_path / path}: {tmp_path / 'afile'} is a file, not a "
                                             "folder; --save takes a folder"):
            output_dir(tmp_path / path, "--save")
    with pytest.raises(ValueError, match=r"--save /proc/x/run: cannot create the folder /proc/x/run \(No such file"):
        output_dir("/proc/x/run", "--save")  # a pseudo file system: refused even for root
    with pytest.raises(ValueError, match=r"--save /proc: cannot write in /proc \("):
        output_dir("/proc", "--save")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)  # a folder this user may not write (root may write any)
    with pytest.raises(ValueError, match=r"--out DIR .*: cannot write in .*/new/run \(Permission denied\)"):
        output_dir(tmp_path / "new" / "run", "--out DIR")
    assert not (tmp_path / "new").exists()  # what the check made is removed again when it fails


@pytest.mark.parametrize("keep", [True, False])
def test_output_dir_keeps_the_folder_it_made_only_when_asked(keep, tmp_path):
    from memfit.errors import output_dir

    (tmp_path / "old").mkdir()
    assert output_dir(tmp_path / "old" / "a" / "b", "--save", keep=keep) == tmp_path / "old" / "a" / "b"
    assert (tmp_path / "old" / "a" / "b").is_dir() == keep and (tmp_path / "old" / "a").exists() == keep
    assert (tmp_path / "old").is_dir()  # what was there stays
    assert not keep or list((tmp_path / "old" / "a" / "b").iterdir()) == []  # the test file is gone
    output_dir(tmp_path / "old", "--save", keep=False)  # an existing folder: nothing made, nothing removed
    assert (tmp_path / "old").is_dir()
