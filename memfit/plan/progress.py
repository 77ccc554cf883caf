"""`memfit plan`'s progress on stderr while a planner runs (up to --time-limit): a spinner, the wall time against
the limit as a bar, and the segment or window the heuristic planners are on. rich, as the other commands' bars;
stdout is never written, so `--json` still prints exactly one object there."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def solve_progress(show: bool, planner: str, time_limit_s: float, clock: str = "wall",
                   wall_cap_s: float | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """Yield make_plan's `progress(k, n)` callback while the bar is shown, None where it is not: `show` False
    (--no-progress) or stderr not a terminal (a bar there draws nothing and leaves a blank line). On the work
    clock the bar runs against the wall cap (make_plan's 3 x --time-limit unless given)."""
    from memfit.progress import bar_console

    console = bar_console(show)
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, Progress, ProgressBar, ProgressColumn, SpinnerColumn, Task, TextColumn
    from rich.text import Text

    limit = time_limit_s if clock == "wall" else wall_cap_s if wall_cap_s is not None else 3 * time_limit_s
    limit = max(limit, 1e-3)  # --time-limit 0: a full bar, not a division by zero

    class ClockBar(BarColumn):
        """The bar is the elapsed time against the limit: it moves on rich's refresh, without updates."""

        def render(self, task: Task) -> ProgressBar:
            return ProgressBar(total=limit, completed=min(task.elapsed or 0.0, limit), width=self.bar_width,
                               style=self.style, complete_style=self.complete_style,
                               finished_style=self.finished_style)

    class Elapsed(ProgressColumn):
        def render(self, task: Task) -> Text:
            of = f"{limit:.0f} s" if clock == "wall" else f"{limit:.0f} s wall cap ({time_limit_s:g} s of work)"
            return Text(f"{task.elapsed or 0.0:.0f}/{of}")

    bar = Progress(SpinnerColumn(), TextColumn(f"planning ({planner})"), ClockBar(), Elapsed(),
                   TextColumn("{task.description}"), console=console, transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def progress(k: int, n: int) -> None:  # the heuristic planners' segments (or windows) k of n
            bar.update(task, description=f"segment {k}/{n}")

        yield progress
