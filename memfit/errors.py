"""Errors a user can fix by changing their input: CLIs print these as one message, servers as a 4xx."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

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


def command_name(args) -> str:
    """The command as argparse names it in its own usage errors, 'memfit quant vit': memfit.cli.main records the
    chosen parser's prog in args.prog; a namespace built by hand (a test) falls back to 'memfit COMMAND'."""
    prog = getattr(args, "prog", None)
    if prog:
        return prog
    command = getattr(args, "command", None)
    return f"memfit {command}" if command else "memfit"


def warn_budget_past_memory(args, option: str, spec: object, nbytes: int) -> None:
    """A budget of more bytes than the machine's memory (`--memory-budget 1000TiB`) is taken, but can never be what
    stops the work: memory runs out first. Say so on stderr (stdout may be a --json object), `PROG: warning: ...`,
    naming the option, the value given and the machine's total memory (psutil's, as memory.budget measures what is
    available). `nbytes` is the budget as resolved; a fraction of the available memory never passes the total."""
    import psutil

    from memfit.memory.budget import format_bytes

    total = int(psutil.virtual_memory().total)
    if nbytes > total:
        print(f"{command_name(args)}: warning: {option} {spec} ({format_bytes(nbytes)}) is more than this machine's "
              f"memory, {format_bytes(total)} in all: memory runs out before the budget does, so the budget is never "
              "what stops the work", file=sys.stderr)


def refuse(args, message: str | BaseException) -> int:
    """A user's mistake, said once for every command: `PROG: error: message` on stderr, the prefix argparse puts on
    its own refusals of the same command (bad option values), exit code 2, and with --json the one object
    {"error": message} on stdout."""
    print(f"{command_name(args)}: error: {message}", file=sys.stderr)
    json_error(args, message if isinstance(message, BaseException) else ValueError(message))
    return 2


def interrupted(args, message: str = "interrupted") -> int:
    """Ctrl-C: one line on stderr instead of a traceback and, with --json, {"error": message} on stdout (a script
    reading the output still gets exactly one object); the shell's status for SIGINT."""
    print(message, file=sys.stderr)
    json_error(args, KeyboardInterrupt(message))
    return 130


def guard(func):
    """Wrap a command's `func(args) -> int`: the errors a user can fix become one message and exit code 2,
    without a traceback (and, with --json, {"error": message} on stdout); Ctrl-C exits 130 (`interrupted`). The LLM and quant commands use it."""

    def run(args) -> int:
        try:
            return func(args)
        except USER_ERRORS as exc:
            return refuse(args, exc)
        except KeyboardInterrupt:
            return interrupted(args)

    return run


# What matplotlib's savefig writes (Figure.canvas.get_supported_filetypes() with the Agg, PDF, PS, SVG, PGF backends).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp", ".gif",
                 ".avif", ".pgf", ".raw", ".rgba")


def output_path(path: str | os.PathLike, option: str, suffixes: tuple[str, ...] | None = None, *,
                keep: bool = True) -> Path:
    """Check an output file before the work that ends in writing it (a plot, a plan, a checkpoint), so that a path
    that cannot be written is refused at once instead of a traceback that throws the work away. Its folder is checked
    as `output_dir` checks one, and kept as the writers would make it (`keep=False`: nothing is left behind, for a
    writer that makes its folder itself); raises ValueError (a user error) naming `option`."""
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path}: the file name must end in one of {', '.join(suffixes)}")
    if out.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file path")
    _writable_folder(out.parent, f"{option} {path}", keep)
    return out


def output_dir(path: str | os.PathLike, option: str, *, keep: bool = True) -> Path:
    """Check an output folder (`--save DIR`) before the work that ends in writing under it: the deepest part of the
    path that exists must be a folder (not a file, on the path or at its end), the folder must be creatable, and a
    file must be writable in it (permissions, a read-only or pseudo file system such as /proc); a temporary file
    proves it and is removed. With `keep` the folders made for the check stay, for a command that would make them
    anyway; without, they are removed again and nothing is left behind. Raises ValueError (a user error) naming
    `option`, its value and the reason."""
    folder = Path(path)
    _writable_folder(folder, f"{option} {path}", keep, f"; {option} takes a folder")
    return folder


def _writable_folder(folder: Path, what: str, keep: bool, file_hint: str = "") -> None:
    """output_dir's check of `folder`, its messages starting `what: ` (the option and the value given)."""
    full = folder.absolute()
    missing = []  # the parts of the path not there yet, deepest first
    for part in (full, *full.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"{what}: {part} is a file, not a folder{file_hint}")
            break
        missing.append(part)
    done = False
    try:
        try:
            full.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{what}: cannot create the folder {folder} ({exc.strerror or exc})") from None
        try:  # a file can be made there (permissions, a read-only or pseudo file system such as /proc)
            with tempfile.TemporaryFile(dir=full):
                pass
        except OSError as exc:
            raise ValueError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from None
        done = True
    finally:
        if not (keep and done):  # what the check made, deepest first; a folder something else filled meanwhile stays
            for part in missing:
                try:
                    part.rmdir()
                except OSError:
                    break


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: os.path.samefile where both exist (it sees through links, hard links and
    a case-insensitive file system), else the paths with links and '..' resolved."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one does not exist yet (ValueError: an embedded NUL)
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # a link loop: compare the paths as written, made absolute
        return os.path.abspath(a) == os.path.abspath(b)


def distinct_output(out: str | os.PathLike | None, option: str, *others: tuple[str, str | os.PathLike | None]) -> None:
    """Refuse an output path that names a file the command also reads or writes (`others`: (what, path) pairs,
    e.g. ("--model", args.model)): writing it would replace the user's input, or one output the other. Raises
    ValueError (a user error) naming both."""
    if not out:
        return
    for what, path in others:
        if path and same_file(out, path):
            raise ValueError(f"{option} {out} is the same file as {what} {path}; writing it would replace that: "
                             f"give {option} another path")
