"""Where the commands' progress bars draw: rich on stderr, and only on a terminal. To a file or a pipe (`2>log`,
CI) a rich bar draws nothing and leaves one blank line, so there is no bar at all; stdout is never used, so a
command's `--json` object stays alone there."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def bar_console(show: bool = True) -> Console | None:
    """The stderr console a progress bar draws on, or None: `show` False (--no-progress) or stderr not a terminal."""
    if not show:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None
