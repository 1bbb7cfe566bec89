"""Content hashes: of a file, of a folder's files (a model's identity), of a LoRA; big files' remembered.

A hash is always of the bytes there now. Only files of at least `MEMO_MIN_BYTES` (multi-GB checkpoints,
which take seconds) are remembered across runs, and a remembered hash is used only while the file's
device, inode, size, modification time and change time are all as they were when it was hashed
(docs/store.md, "Model identity"). This module imports no torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.atomic import write_json
from tavcli.files.reading import read_json
from tavcli.settings.config import cache_dir

__all__ = ["MEMO_MIN_BYTES", "SETTLED_NS", "content_sha256", "file_sha256", "files_sha256", "lora_file", "lora_sha256"]

# Smaller files are hashed every time: at about 1 GB/s that costs less than trusting any memo.
MEMO_MIN_BYTES = 64 << 20
# A hash is remembered only for a file unchanged this long before it was hashed: a write within the
# same timestamp tick (up to 2 s on FAT, 1 s on HFS+) would leave its times as they were.
SETTLED_NS = 2_000_000_000
# The change time (st_ctime) moves on every write and cannot be set back (os.utime sets it to now).
# On Windows st_ctime is the creation time instead, so nothing there tells a rewrite: no memo.
_CHANGE_TIME_KNOWN = os.name != "nt"
_MEMO_FILE = "file-hashes.json"
# What diffusers loads a LoRA folder's weights from, in its order of preference (the top level only: a
# README or config beside them changes nothing that is loaded).
LORA_WEIGHTS = (".safetensors", ".bin")
STATES = ("scheduler", "optimizer", "checkpoint")  # training states saved beside a LoRA, which diffusers skips


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read now."""
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
    """The SHA-256 of a file's bytes: hashed now, or for a big file remembered from a run that hashed these
    very bytes (same device, inode, size, mtime and ctime, settled when hashed)."""
    stat = file.stat()
    if stat.st_size < MEMO_MIN_BYTES or not _CHANGE_TIME_KNOWN:
        return file_sha256(file)
    path, stamp = str(file.resolve()), _stamp(stat)
    memo = _hash_memo(cache_dir() / _MEMO_FILE)
    known = memo.get(path)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return str(known["sha256"])
    started = time.time_ns()
    digest = file_sha256(file)
    # Not remembered if it changed while being read, or so recently that a rewrite could keep its times.
    if _stamp(file.stat()) == stamp and started - max(stat.st_mtime_ns, stat.st_ctime_ns) >= SETTLED_NS:
        memo[path] = {"stamp": stamp, "sha256": digest}
        kept = {name: value for name, value in memo.items() if isinstance(value, dict)}  # drops the old format
        with contextlib.suppress(OSError):  # a read-only cache only costs time
            write_json(cache_dir() / _MEMO_FILE, kept)
    return digest


def _stamp(stat: os.stat_result) -> list[int]:
    """What tells a file's bytes apart without reading them, as far as the memo trusts it."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


@functools.lru_cache(maxsize=4)
def _hash_memo(path: Path) -> dict[str, Any]:
    """The remembered hashes (file path -> stamp and SHA-256), read once per process (and per cache folder)."""
    try:
        memo = read_json(path)
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def lora_file(path: Path) -> Path:
    """The file a LoRA is loaded from: the file given, or the one diffusers loads from the folder given
    (`pytorch_lora_weights.safetensors`, else its only weights file; `.bin` ones only when there are no
    `.safetensors`). Several and none the standard one: refused, as diffusers would take whichever the
    folder happens to list first. Training states beside the weights are not weights."""
    if not path.is_dir():
        return path
    for suffix in LORA_WEIGHTS:
        found = sorted(
            p for p in path.iterdir() if p.suffix == suffix and p.is_file() and not any(w in p.name for w in STATES)
        )
        if not found:
            continue
        standard = [p for p in found if p.name == f"pytorch_lora_weights{suffix}"]
        if len(found) > 1 and not standard:
            shown = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise TavError(f"the LoRA folder {path} holds {len(found)} weights files ({shown})", "give the one to load")
        return (standard or found)[0]
    raise TavError(
        f"the LoRA folder {path} holds no weights file (.safetensors or .bin)",
        "give the LoRA's .safetensors file, or the folder that holds it",
    )


def lora_sha256(path: Path) -> str:
    """What identifies a LoRA's content in keys: the SHA-256 of the file it is loaded from, whether given as
    the file or as its folder (one LoRA, one entry)."""
    return content_sha256(lora_file(path))
