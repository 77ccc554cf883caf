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
