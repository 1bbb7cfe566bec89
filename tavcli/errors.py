"""The one exception type users see: what went wrong, in a line, and what to try next."""

from __future__ import annotations

__all__ = ["Interrupted", "TavError", "first_line", "interruption"]


class TavError(Exception):
    """A failure caused by the user's input or environment, shown without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class Interrupted(TavError):
    """Ctrl-C or SIGTERM: finished work is in the store, so the same command goes on from there."""

    exit_code = 130

    def __init__(self, message: str = "interrupted", hint: str | None = None) -> None:
        super().__init__(message, hint or "finished work is kept: run the same command again to go on")


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (library errors can be pages long), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__


def interruption(error: BaseException) -> Interrupted | None:
    """The `Interrupted` behind `error`, if any: a signal that lands inside a library can come back wrapped
    (diffusers' lazy imports re-raise what an import raised as a RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, Interrupted):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
