"""Content hashes: of a file, of a folder's files (a model's identity), remembered across runs.

This module imports no torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tavcli.atomic import write_json
from tavcli.config import cache_dir

__all__ = ["content_sha256", "file_sha256", "files_sha256"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(root: Path, files: Iterable[Path]) -> str:
    """A short hash of files' names (relative to `root`) and contents: the identity of a model folder."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(root)}:{content_sha256(file)}\n".encode())
    return digest.hexdigest()[:16]


def content_sha256(file: Path) -> str:
    """The SHA-256 of a file's bytes, remembered (by path, size, mtime and inode) across runs.

    Hashing a multi-GB checkpoint takes seconds; it is done once, not on every command.
    """
    stat = file.stat()
    memo_key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    memo = _hash_memo(cache_dir() / "file-hashes.json")
    if memo_key not in memo:
        memo[memo_key] = file_sha256(file)
        with contextlib.suppress(OSError):  # a read-only cache only costs time
            write_json(cache_dir() / "file-hashes.json", memo)
    return memo[memo_key]


@functools.lru_cache(maxsize=4)
def _hash_memo(path: Path) -> dict[str, str]:
    """The remembered hashes, read once per process (and per cache folder)."""
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}
