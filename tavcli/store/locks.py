"""The project's lock protocol: every lock file under `PROJECT/.locks/` and what holding one means.

Three kinds of lock, all OS file locks (flock/fcntl through filelock) that the kernel releases when their
holder dies, so no lock is ever left stale (layout and rules: docs/store.md):

- `KIND-KEY.lock` (and wider ones such as `checkpoints-RUN.lock`, `project.lock`): held while a command
  computes or writes something; `lock` takes one, `busy` probes one.
- `use-KIND-KEY-PID.lock`: one per process per entry it reads (`using`), so any number of commands can use
  an entry at once; `users` and `in_use` see them, `removing` refuses while one is live.
- `uses.lock`: held for a moment while a command starts using entries or a removal checks for users, so
  neither races the other.

This module imports no torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from tavcli.errors import TavError
from tavcli.store.entry import Entry, noun

__all__ = [
    "BUSY",
    "LOCKS",
    "USES_LOCK",
    "HeldUse",
    "UseRegistry",
    "busy",
    "in_use",
    "lock",
    "removing",
    "use_path",
    "users",
    "using",
]

LOCKS = ".locks"  # the folder of lock files in a project
# Held briefly while a command starts using entries or a removal checks for users, so neither races the other.
USES_LOCK = "uses"
BUSY = "is being computed or written by a running tav command"  # its own lock is held
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # no lock file can be made: nobody writes here


# --- computing and writing: one exclusive lock per name ------------------------------------------------


@contextmanager
def lock(
    root: Path,
    name: str,
    wait: bool = True,
    quiet: bool = False,
    optional: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[bool]:
    """An exclusive OS file lock, released by the kernel if its holder dies (so no stale locks); yields
    whether it is held. Without `wait` a busy lock is not waited for (yields False); `quiet` waits
    without telling `on_wait` (for locks held only for a moment); `optional` goes on unlocked in a
    project this user cannot write to (where no tav command can remove or write anything either)."""
    folder = root / LOCKS
    file_lock = FileLock(str(folder / f"{name}.lock"), thread_local=False)
    held: bool | None = True  # None: busy
    try:
        folder.mkdir(parents=True, exist_ok=True)
        file_lock.acquire(timeout=0)
    except Timeout:
        held = None
    except OSError as error:
        if not optional or error.errno not in READ_ONLY:
            raise
        held = False
    if held is None and wait:
        if not quiet and on_wait is not None:
            on_wait(f"waiting for another tav process working on {name} in {root}")
        file_lock.acquire()
        held = True
    try:
        yield bool(held)
    finally:
        if held:
            file_lock.release()


def busy(root: Path, name: str) -> bool:
    """Whether a live process holds lock `name` right now."""
    file_lock = FileLock(str(root / LOCKS / f"{name}.lock"), thread_local=False)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # no lock file can be made, so nobody holds one
        return False
    file_lock.release()
    return False


# --- reading: this process's use locks --------------------------------------------------------------------


@dataclass
class HeldUse:
    """One use lock this process holds, and how many `using` blocks hold it now."""

    lock: FileLock
    holds: int = 1


@dataclass
class UseRegistry:
    """This process's use locks by path: a path is locked once, however many `using` blocks (in any
    thread) hold it, and released by the last of them."""

    held: dict[Path, HeldUse] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, path: Path) -> bool:
        """Take (or count one more hold of) the use lock `path`; False where it cannot be made."""
        with self.guard:
            if path in self.held:
                self.held[path].holds += 1
                return True
            file_lock = FileLock(str(path), thread_local=False)
            try:
                file_lock.acquire(timeout=0)  # named after this process: only a dead one could have held it
            except OSError:  # a read-only project: nothing can remove anything from it either
                return False
            self.held[path] = HeldUse(file_lock)
            return True

    def release(self, path: Path) -> None:
        """Drop one hold of the use lock `path`; the last one releases it and deletes its file."""
        with self.guard:
            use = self.held[path]
            use.holds -= 1
            if use.holds == 0:
                del self.held[path]
                use.lock.release()
                with contextlib.suppress(OSError):  # another process may be probing it; it is free either way
                    path.unlink()

    def holds(self, path: Path) -> int:
        """How many `using` blocks hold the use lock `path` now (0: not locked by this process)."""
        with self.guard:
            use = self.held.get(path)
            return use.holds if use else 0


_registry = UseRegistry()  # one per process: the kernel holds locks per open file, not per thread


def use_path(root: Path, kind: str, key: str, pid: int) -> Path:
    """The use lock of process `pid` on entry `kind/key`."""
    return root / LOCKS / f"use-{kind}-{key}-{pid}.lock"


@contextmanager
def using(root: Path, entries: Iterable[Entry], doing: str = "this command") -> Iterator[None]:
    """Hold `entries` in use while the block runs: `tav rm` refuses them and `tav gc` leaves them.

    Each process holds its own lock file per entry (`.locks/use-KIND-KEY-PID.lock`), so any number
    of commands can use an entry at once, and the kernel drops the hold of one that dies. An entry
    already removed is one line naming it (`doing`: what was running, e.g. "this edit").
    """
    held: list[Path] = []
    try:
        with lock(root, USES_LOCK, quiet=True, optional=True):
            for entry in entries:
                if not entry.complete:
                    raise TavError(
                        f"the {noun(entry.kind)} {entry.key} was removed by another tav command while {doing} ran",
                        "run it again",
                    )
                path = use_path(root, entry.kind, entry.key, os.getpid())
                if _registry.hold(path):
                    held.append(path)
        yield
    finally:
        for path in held:
            _registry.release(path)


# --- removing: who holds an entry --------------------------------------------------------------------------


def users(root: Path, kind: str, key: str) -> list[int]:
    """The ids of the live processes that hold entry `kind/key` in use (see `using`)."""
    found = []
    for path in sorted((root / LOCKS).glob(f"use-{kind}-{key}-*.lock")):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and busy(root, path.stem):  # a dead process's file is left behind, unlocked
            found.append(int(pid))
    return found


def in_use(root: Path, kind: str, key: str) -> str | None:
    """Why a live process holds entry `kind/key` (computing, writing or using it), or None."""
    if busy(root, f"{kind}-{key}"):
        return BUSY
    with lock(root, USES_LOCK, quiet=True, optional=True):  # probing a use lock must not block taking it
        pids = users(root, kind, key)
    return _used_by(pids) if pids else None


@contextmanager
def removing(root: Path, kind: str, key: str) -> Iterator[None]:
    """Hold entry `kind/key` for removal, or refuse in one line while a live process computes or uses it.

    The block runs under the entry's lock and the uses lock: no command starts using the entry
    meanwhile, so once its `meta.json` is gone (in the block) none ever will.
    """
    with contextlib.ExitStack() as held:
        if not held.enter_context(lock(root, f"{kind}-{key}", wait=False)):
            raise _refused(kind, key, BUSY)
        held.enter_context(lock(root, USES_LOCK, quiet=True))
        pids = users(root, kind, key)
        if pids:
            raise _refused(kind, key, _used_by(pids))
        yield


def _used_by(pids: list[int]) -> str:
    return f"is in use by a running tav command (process {', '.join(map(str, pids))})"


def _refused(kind: str, key: str, why: str) -> TavError:
    return TavError(f"{kind}/{key} {why}", "run it again when that command has finished")
