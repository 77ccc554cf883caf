"""The `memfit` entry point: a reader that closes the pipe early ends the command quietly; an unknown option is
reported with its command's usage."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_stdout_pipe_ends_without_a_traceback():
    argv = ["fit", "--json", "--no-runtime"]  # one print() of a JSON object, a few seconds
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write is EPIPE (`memfit fit --json | true`)
    try:
        done = subprocess.run([sys.executable, "-m", "memfit.cli", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141


@pytest.mark.parametrize("argv, usage", [(["generate", "hi", "--bogus"], "usage: memfit generate "),
                                         (["train", "local", "--bogus"], "usage: memfit train local "),
                                         (["plan", "--bogus"], "usage: memfit plan ")])
def test_an_unknown_option_is_reported_with_its_commands_usage(argv, usage, capsys):
    # it was reported by the top parser: 'usage: memfit [-h] COMMAND ...', which says nothing of the options
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command", ["plan", "quant", "costmodel", "fit"])
def test_every_option_says_what_it_is(command):
    """`--help` listed options with no word on them (costmodel's --db, --seed, --json; quant train-vit's --lr;
    plan's --planner, fit's --model and --batch): a new user could not tell a seed's role or a default."""
    import argparse

    from memfit.cli import build_parser

    def bare(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from bare(p, f"{name} {sub}")
            elif action.help is None and action.dest != "help":
                yield f"{name} {action.option_strings[0] if action.option_strings else action.dest}"

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(bare(top.choices[command], f"memfit {command}")) == []


@pytest.mark.parametrize("argv", [["fit", "--batch", "abc"], ["plan", "--bogus"]])
@pytest.mark.parametrize("option, as_json", [("--json", True), ("--jso", True), ("--js", True), ("--jsonx", False)])
def test_a_usage_error_is_json_when_json_is_asked_for_as_argparse_reads_it(argv, option, as_json, capsys):
    # argparse takes --jso for --json (the command then prints JSON), but a usage error came out as text only
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], option, *argv[1:]])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert (json.loads(out)["error"] in err) if as_json else out == ""


@pytest.mark.parametrize("option", ["--jso", "--js"])
def test_an_abbreviation_before_the_command_is_not_taken_for_json(option, capsys):
    # `memfit --jso fit` hands --jso to `memfit`, which has no --json: the usage error is text, as the command's
    # output would be, while `memfit fit --jso` asks fit for JSON
    with pytest.raises(SystemExit):
        main([option, "fit", "--batch", "abc"])
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        main(["fit", option, "--batch", "abc"])
    assert json.loads(capsys.readouterr().out)["error"]


def test_json_is_detected_exactly_where_argparse_resolves_an_option_to_it():
    from memfit.cli import _asks_for_json

    for allow_abbrev in (True, False):
        parser = argparse.ArgumentParser(allow_abbrev=allow_abbrev, exit_on_error=False)
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--jobs", type=int)
        parser.add_argument("rest", nargs="*")
        for arg in ("--json", "--jso", "--js", "--j", "--jo", "--jsonx", "-json", "json"):
            try:
                parsed = parser.parse_known_args([arg])[0].json
            except (argparse.ArgumentError, SystemExit):  # ambiguous: --j could be --json or --jobs
                parsed = False
            assert _asks_for_json(parser, [arg]) == parsed, (arg, allow_abbrev)
        assert not _asks_for_json(parser, ["--", "--json"])  # after `--`, a positional word
        assert not parser.parse_known_args(["--", "--json"])[0].json
