"""Rich rendering for the command line: notes and progress on stderr, records on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
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

from tavcli.progress import Advance, Reporter

__all__ = ["RichReporter", "print_record", "stderr"]

stderr = Console(stderr=True, highlight=False, soft_wrap=True)  # long paths and messages stay one line


class _StepsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} it/s", style="progress.data.speed")


class RichReporter(Reporter):
    """Notes as dim lines and each task as a progress bar with its speed, time left and loss."""

    def note(self, message: str) -> None:
        stderr.print(f"[dim]{message}[/dim]")

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
        with Progress(*columns, console=stderr) as progress:
            task_id = progress.add_task(description, total=total, completed=completed, status="")

            def advance(**fields: Any) -> None:
                status = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
                progress.update(task_id, advance=1, status=status)

            yield advance


def print_record(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, for scripts."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
