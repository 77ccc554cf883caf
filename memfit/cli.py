"""`memfit <command>`: one thin entry point; each family registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each family owns its commands in its own `cli` module, which defines `register(subparsers)`: it adds
# parsers whose `func(args) -> int` runs the command. Registration must stay cheap: heavy imports
# (torch, ortools, ...) happen inside `func`, so `memfit --help` is instant.
FAMILY_CLIS = ("memfit.llm.cli", "memfit.train.cli", "memfit.plan.cli", "memfit.quant.cli", "memfit.plan.cost.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfit", description="Run, serve and train models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in FAMILY_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue  # that family has no commands yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `memfit ... | head` closed the pipe: end quietly, as `cat` would, not with a traceback
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered does not fail again
    (`Exception ignored ... BrokenPipeError` on stderr)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file behind sys.stdout (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
