"""`memfit <command>`: one thin entry point; each family registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Each family owns its commands in its own `cli` module, which defines `register(subparsers)`: it adds
# parsers whose `func(args) -> int` runs the command. Registration must stay cheap: heavy imports
# (torch, ortools, ...) happen inside `func`, so `memfit --help` is instant.
FAMILY_CLIS = ("memfit.llm.cli", "memfit.train.cli", "memfit.plan.cli", "memfit.quant.cli", "memfit.plan.cost.cli")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that keeps a usage error's message, so that with `--json` main can also print it as the one
    JSON object on stdout. Subcommand parsers are built with the parent's class, so every one of them does."""

    last_error: str | None = None
    last_refuser: argparse.ArgumentParser | None = None  # the (sub)command parser that said last_error

    def error(self, message: str):  # type: ignore[override]
        _Parser.last_error, _Parser.last_refuser = message, self
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memfit", description="Run, serve and train models inside a memory budget.")
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
        parser = build_parser()
        _Parser.last_error = _Parser.last_refuser = None
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # told by the command's own parser, so the usage printed is that command's, not `memfit COMMAND`
                _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
            # the command's refusals (memfit.errors.refuse) then carry the prefix argparse gives its own: 'memfit
            # quant vit: error: ...'
            args.prog = _chosen_parser(parser, args).prog
        except SystemExit:
            if _Parser.last_error is not None and _asks_for_json(_Parser.last_refuser,
                                                                 sys.argv[1:] if argv is None else argv):
                print(json.dumps({"error": _Parser.last_error}), flush=True)  # the usage and message are on stderr
            raise
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `memfit ... | head` closed the pipe: end quietly, as `cat` would, not with a traceback
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def _asks_for_json(parser: argparse.ArgumentParser | None, argv: list[str]) -> bool:
    """Whether `argv` holds `--json` as argparse reads it: the word itself, or (as `parser`, the command's parser
    that refused the arguments, resolves an option) `--json=...` or an abbreviation that only --json starts with,
    `--js` or `--jso`, which a command that runs takes for --json too. Nothing after `--`, which ends the options;
    and an abbreviation only after the command's own words (`memfit --jso fit` gave --jso to `memfit`, which has no
    --json, so `fit` would not print JSON). The word itself counts anywhere: whoever typed `--json` asked for JSON,
    wherever argparse refused it."""
    options = [] if parser is None else [s for a in parser._actions for s in a.option_strings]
    words = [] if parser is None else parser.prog.split()[1:]  # 'memfit train local' -> the words 'train', 'local'
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
        if words and arg == words[0]:
            words.pop(0)
            continue
        name = arg.split("=", 1)[0]
        if parser is None or words or "--json" not in options or not name.startswith("--") or len(name) < 3:
            continue
        if name == "--json" or (name not in options and parser.allow_abbrev
                                and [s for s in options if s.startswith(name)] == ["--json"]):
            return True
    return False


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest (sub)command parser that `args` went through: `memfit train local` -> train's `local`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs and subs[0].dest else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


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
