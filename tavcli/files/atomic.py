"""Atomic writes: everything goes to a temporary name beside its destination, then `os.replace`.

A reader therefore sees either the old complete file or the new complete file, never a partial one,
even when the writer is killed half-way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tavcli.errors import TavError

__all__ = ["atomic_path", "create_json", "write_json", "write_text"]


@contextmanager
def atomic_path(final: Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `final` (a file or a folder); move it into place on success.

    On a full disk the old `final`, if any, is left as it was and the error names the path and,
    when `needed` (bytes) is given, the space it takes.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary(final)
    try:
        try:
            yield temp
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            size = "" if not needed else f" ({needed / 1e6:.1f} MB)" if needed >= 1e6 else f" ({needed / 1e3:.0f} kB)"
            raise TavError(
                f"no space left on the device to write {final}{size}", "free some space (`tav gc` helps), then rerun"
            ) from None
        if temp.is_dir() and final.is_dir():
            # os.replace cannot overwrite a non-empty folder: swap the old one out first.
            old = temp.with_suffix(".old")
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, _json_text(data))


def create_json(path: Path, data: Any) -> None:
    """Write `path` completely, but only if no file of that name exists yet (first writer wins).

    The text goes to a temporary file that is then hard-linked to `path`: linking fails on an
    existing name, so a concurrent writer's file is never replaced.
    """
    temp = _temporary(path)
    try:
        temp.write_text(_json_text(data), encoding="utf-8")
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
