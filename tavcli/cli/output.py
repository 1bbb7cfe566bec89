"""What goes where, for every command (docs/cli.md, "Output"):

- **stdout** gets results, one JSON object per line. Commands that make or find artifacts (`tune`,
  `invert`, `edit`, `demo`, `import`, `batch`, `rm`, `gc`) always print them; commands that report
  (`ls`, `verify`, `config`, `eval`) print them with `--json`, or whenever stdout is not a terminal.
- **stderr** gets everything meant for people: progress bars, notes, tables, summaries and errors.
  `-q/--quiet` silences all of it but errors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tavcli.files.sizes import human_size
from tavcli.progress import Advance, Reporter

if TYPE_CHECKING:
    from rich.table import Table

    from tavcli.workflow.session import Artifact

__all__ = [
    "RichReporter",
    "human_size",
    "print_record",
    "progress",
    "records_wanted",
    "report",
    "set_quiet",
    "show",
    "stderr",
]

stderr = Console(stderr=True, highlight=False, soft_wrap=True)  # long paths and messages stay one line


def set_quiet(quiet: bool) -> None:
    """`-q/--quiet`: nothing on stderr but errors (which are printed by their own console), not even the
    libraries' warnings (peft's and transformers' come through `warnings` and `logging`)."""
    import logging

    stderr.quiet = quiet
    logging.disable(logging.CRITICAL if quiet else logging.NOTSET)  # undone for the next in-process command
    if quiet:
        import warnings

        warnings.simplefilter("ignore")


def records_wanted(as_json: bool) -> bool:
    """Whether a reporting command prints JSON Lines on stdout: asked for, or stdout is no terminal."""
    return as_json or not sys.stdout.isatty()


def print_record(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, for scripts."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def show(table: Table | str) -> None:
    """A table or a line for people, on stderr."""
    stderr.print(table)


def report(artifacts: list[Artifact]) -> None:
    """Each artifact's record on stdout, and a line on stderr saying whether it was cached."""
    for artifact in artifacts:
        print_record(artifact.record())
        state = "[green]cached[/green]" if artifact.cached else f"done in {artifact.seconds:.1f}s"
        stderr.print(f"{artifact.kind:<9} {state}  {escape(str(artifact.path))}")


class _StepsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} it/s", style="progress.data.speed")


class RichReporter(Reporter):
    """Notes as dim lines and each task as a progress bar with its speed, time left and loss."""

    def note(self, message: str) -> None:
        stderr.print(f"[dim]{escape(message)}[/dim]")

    @contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _StepsPerSecond(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        with Progress(*columns, console=stderr) as bar:
            task_id = bar.add_task(escape(description), total=total, completed=completed, status="")

            def advance(units: int = 1, **fields: Any) -> None:
                status = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
                bar.update(task_id, advance=units, status=status)

            yield advance


@contextmanager
def progress(description: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr for work the command itself loops over."""
    with RichReporter().task(description, total) as advance:
        yield advance
