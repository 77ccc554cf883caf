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
