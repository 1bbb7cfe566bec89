"""How library code reports notes and progress without knowing who is watching.

Library functions take a `Reporter`; the base class is silent (tests, scripts), the command line
passes one that draws Rich progress bars on stderr, and the app one that its page polls (and whose Stop
button asks a tune to stop as Ctrl-C does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Advance", "Reporter"]

Advance = Callable[..., None]
"""Marks one unit of a task done (or the count given, 0 to only show news); keyword arguments (such as
`loss=0.1`) update its shown fields."""


class Reporter:
    """Receives notes and progress from long-running work. This base class ignores them."""

    def note(self, message: str) -> None:
        """A one-line remark the user should see (a rounded size, a reused result)."""

    @contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        """A unit of work of `total` steps (`completed` already done); call the yielded function after each step."""
        yield _ignore

    def stop_requested(self) -> bool:
        """Whether whoever watches asks the work to stop at its next safe point (a tune: after its current step,
        its state saved, as at Ctrl-C). This base class never asks."""
        return False


def _ignore(units: int = 1, **fields: Any) -> None:
    pass
