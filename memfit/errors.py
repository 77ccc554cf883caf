"""Errors a user can fix by changing their input: CLIs print these as one message, servers as a 4xx."""
from __future__ import annotations

import sys

from memfit.memory.budget import MemoryBudgetExceeded

# ValueError covers ModelFormatError, InvalidSamplingParams, RequestError and bad sizes;
# FileNotFoundError covers missing model directories and data sets.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, MemoryBudgetExceeded)


def json_error(args, exc: BaseException) -> None:
    """With --json, a refused command still prints exactly one JSON object on stdout, {"error": message}, as
    `memfit plan --json` does; the message is on stderr as well."""
    if getattr(args, "json", False):
        import json

        print(json.dumps({"error": str(exc)}), flush=True)


def guard(func):
    """Wrap a command's `func(args) -> int`: the errors a user can fix become one message and exit code 2,
    without a traceback (and, with --json, {"error": message} on stdout); Ctrl-C exits 130. The LLM and quant commands use it."""

    def run(args) -> int:
        try:
            return func(args)
        except USER_ERRORS as exc:
            print(f"memfit {args.command}: error: {exc}", file=sys.stderr)
            json_error(args, exc)
            return 2
        except KeyboardInterrupt:
            return 130

    return run
