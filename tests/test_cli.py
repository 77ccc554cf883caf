"""The `memfit` entry point: a reader that closes the pipe early ends the command quietly; an unknown option is
reported with its command's usage."""
from __future__ import annotations

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
