"""The project directory: a content-addressed cache of everything `tav` computes for one clip.

`CLIP.tav/` holds one folder per entry kind (`latents/`, `embeddings/`, `tunes/`, `inversions/`,
`edits/`), each entry `KIND/KEY/` (see `tavcli.store.entry`), and `project.json` naming the tune and
inversion `tav edit` uses now (layout: docs/store.md). `KEY` is a hash of the entry's spec (every
input that determines it) and `METHOD_VERSION`. Locks make concurrent runs compute each entry once.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tavcli.errors import TavError
from tavcli.files.atomic import create_json, write_json
from tavcli.files.reading import parse_json
from tavcli.store.entry import KEY, Entry, noun

__all__ = ["BUSY", "METHOD_VERSION", "STORE_VERSION", "STATE_FILE", "Project", "cache_key"]

# Bump when a change to the method changes what an entry holds: old entries then stop matching.
METHOD_VERSION = 1
# Bump when the layout changes: an older tav refuses a newer project instead of misreading it.
STORE_VERSION = 1
STATE_FILE = "project.json"
# Held briefly while a command starts using entries or a removal checks for users, so neither races the other.
USES_LOCK = "uses"
BUSY = "is being computed or written by a running tav command"  # its own lock is held
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # no lock file can be made: nobody writes here

# This process's use locks (`.locks/use-KIND-KEY-PID.lock`) by path: the lock and how many holds it has.
_uses: dict[Path, list[Any]] = {}
_uses_guard = threading.Lock()


def cache_key(spec: dict[str, Any]) -> str:
    """A short, stable hash of `spec` (JSON-serialisable) and the method version."""
    canonical = json.dumps({"method": METHOD_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Project:
    """A project directory: keyed entries, checkpoints, and `project.json` (the pointers `tav edit` follows)."""

    def __init__(self, root: Path, on_wait: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.on_wait = on_wait or (lambda message: None)  # told when a lock is busy

    # --- entries -------------------------------------------------------------------------------

    def entry(self, kind: str, spec: Mapping[str, Any]) -> Entry:
        key = cache_key({"kind": kind, **spec})
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec=dict(spec))

    def at(self, kind: str, key: str) -> Entry:
        """Entry `kind/key` by its key alone, its spec unread (for what needs only its place)."""
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec={})

    def find(self, kind: str, key: str) -> Entry:
        entry = self.at(kind, key)
        if not entry.complete:
            raise TavError(f"project {self.root} has no complete {kind[:-1]} {key}", "run `tav tune` again")
        return Entry(kind=kind, key=key, path=entry.path, spec=entry.meta()["spec"])

    def complete_keys(self, kind: str) -> list[str]:
        """Keys of the entries of `kind` that are complete."""
        folder = self.root / kind
        return sorted(p.name for p in folder.glob("*") if KEY.fullmatch(p.name) and (p / "meta.json").is_file())

    def produce(self, entry: Entry, compute: Callable[[], None], force: bool = False, lock: str | None = None) -> bool:
        """Make sure `entry` exists, computing it under its lock unless present; return whether it was cached.

        Checking again after taking the lock means two processes never compute the same entry twice.
        `lock` names a wider lock held first (a tune's whole training run); the entry's own lock is
        always held too, so `tav gc` sees the entry as work under way.
        """
        if entry.complete and not force:
            return True
        with contextlib.ExitStack() as held:
            if lock is not None:
                held.enter_context(self.lock(lock))
            held.enter_context(self.lock(f"{entry.kind}-{entry.key}"))
            if entry.complete and not force:
                return True
            parent = self._parent(entry)
            if parent is not None and parent.complete:  # what it is computed from stays until it is stored
                held.enter_context(self.using([parent], f"this {noun(entry.kind)}"))
            compute()
        return False

    # --- entries in use -----------------------------------------------------------------------------

    @contextmanager
    def using(self, entries: Iterable[Entry], doing: str = "this command") -> Iterator[None]:
        """Hold `entries` in use while the block runs: `tav rm` refuses them and `tav gc` leaves them.

        Each process holds its own lock file per entry (`.locks/use-KIND-KEY-PID.lock`), so any number
        of commands can use an entry at once, and the kernel drops the hold of one that dies. An entry
        already removed is one line naming it (`doing`: what was running, e.g. "this edit").
        """
        held: list[Path] = []
        try:
            with self.lock(USES_LOCK, quiet=True, optional=True):
                for entry in entries:
                    if not entry.complete:
                        raise TavError(
                            f"the {noun(entry.kind)} {entry.key} was removed by another tav command while {doing} ran",
                            "run it again",
                        )
                    path = self._use_path(entry.kind, entry.key, os.getpid())
                    if _hold_use(path):
                        held.append(path)
            yield
        finally:
            for path in held:
                _release_use(path)

    def users(self, kind: str, key: str) -> list[int]:
        """The ids of the live processes that hold entry `kind/key` in use (see `using`)."""
        found = []
        for path in sorted((self.root / ".locks").glob(f"use-{kind}-{key}-*.lock")):
            pid = path.stem.rsplit("-", 1)[-1]
            if pid.isdigit() and self.busy(path.stem):
                found.append(int(pid))
        return found

    def in_use(self, kind: str, key: str) -> str | None:
        """Why a live process holds entry `kind/key` (computing, writing or using it), or None."""
        if self.busy(f"{kind}-{key}"):
            return BUSY
        with self.lock(USES_LOCK, quiet=True, optional=True):  # probing a use lock must not block taking it
            pids = self.users(kind, key)
        return _used_by(pids) if pids else None

    @contextmanager
    def removing(self, kind: str, key: str) -> Iterator[None]:
        """Hold entry `kind/key` for removal, or refuse in one line while a live process computes or uses it.

        The block runs under the entry's lock and the uses lock: no command starts using the entry
        meanwhile, so once its `meta.json` is gone (in the block) none ever will.
        """
        with contextlib.ExitStack() as held:
            if not held.enter_context(self.lock(f"{kind}-{key}", wait=False)):
                raise _refused(kind, key, BUSY)
            held.enter_context(self.lock(USES_LOCK, quiet=True))
            pids = self.users(kind, key)
            if pids:
                raise _refused(kind, key, _used_by(pids))
            yield

    def _parent(self, entry: Entry) -> Entry | None:
        if entry.parent is None:
            return None
        return self.at(*entry.parent)

    def _use_path(self, kind: str, key: str, pid: int) -> Path:
        return self.root / ".locks" / f"use-{kind}-{key}-{pid}.lock"

    # --- locks and state ------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str, wait: bool = True, quiet: bool = False, optional: bool = False) -> Iterator[bool]:
        """An exclusive OS file lock, released by the kernel if its holder dies (so no stale locks); yields
        whether it is held. Without `wait` a busy lock is not waited for (yields False); `quiet` waits
        without a note (for locks held only for a moment); `optional` goes on unlocked in a project this
        user cannot write to (where no tav command can remove or write anything either)."""
        folder = self.root / ".locks"
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
            if not quiet:
                self.on_wait(f"waiting for another tav process working on {name} in {self.root}")
            file_lock.acquire()
            held = True
        try:
            yield bool(held)
        finally:
            if held:
                file_lock.release()

    def busy(self, name: str) -> bool:
        """Whether a live process holds lock `name` right now."""
        file_lock = FileLock(str(self.root / ".locks" / f"{name}.lock"), thread_local=False)
        try:
            file_lock.acquire(timeout=0)
        except Timeout:
            return True
        except OSError:
            return False
        file_lock.release()
        return False

    @property
    def state(self) -> dict[str, Any]:
        """`project.json`, checked; rebuilt from the entries when it is missing (see `_rebuilt_state`)."""
        path = self.root / STATE_FILE
        try:
            data = path.read_bytes()  # undecodable bytes are damage, reported as such
        except FileNotFoundError:
            return self._rebuilt_state()
        except OSError as error:
            raise TavError(f"cannot read {path}: {error.strerror}") from None
        problem = _state_problem(data)
        if problem:
            raise TavError(
                f"damaged {path}: {problem}",
                f"`tav gc -p {self.root}` removes it; it is then rebuilt from the entries",
            )
        state: dict[str, Any] = parse_json(data)
        return state

    def state_problem(self) -> str | None:
        """Why `project.json` is damaged, or None (also when it is missing: it is rebuilt then)."""
        try:
            return _state_problem((self.root / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except OSError as error:
            return f"cannot be read: {error.strerror}"

    def _rebuilt_state(self) -> dict[str, Any]:
        """The pointers a missing `project.json` can be rebuilt with: the tune if only one exists, and
        its inversion if it has only one. Written back (if still missing) so the choice stays."""
        tunes = self.complete_keys("tunes")
        if not tunes:
            return {}
        state: dict[str, Any] = {"store_version": STORE_VERSION, "tune": None, "inversion": None}
        if len(tunes) == 1:
            inverted = self.complete_keys("inversions")
            of_tune = [key for key in inverted if self._spec_of("inversions", key).get("tune") == tunes[0]]
            state.update(tune=tunes[0], inversion=of_tune[0] if len(of_tune) == 1 else None)
        with contextlib.suppress(OSError):  # a read-only project only loses the memo
            create_json(self.root / STATE_FILE, state)
        return state

    def _spec_of(self, kind: str, key: str) -> dict[str, Any]:
        """An entry's spec, or {} if its metadata is damaged."""
        try:
            return self.find(kind, key).spec
        except TavError:
            return {}

    def pointers(self) -> set[str]:
        """The keys `project.json` points at (none while it is damaged: the store tools list that)."""
        try:
            state = self.state
        except TavError:
            return set()
        return {str(state[name]) for name in ("tune", "inversion") if state.get(name)}

    def current_tune(self) -> str:
        """The key of the tune `tav edit` and `tav invert` use now."""
        key = self.state.get("tune")
        if key:
            return str(key)
        tunes = self.complete_keys("tunes")
        if tunes:
            raise TavError(
                f"{self.root / STATE_FILE} does not say which of the project's {len(tunes)} "
                f"{'tune' if len(tunes) == 1 else 'tunes'} to use",
                "a tune becomes current when `tav tune` finishes it: run the `tav tune` command of the one you want "
                "again (it is cached, or resumes where it was interrupted), or `tav rm` the others",
            )
        raise TavError(f"project {self.root} was never tuned", f"run `tav tune CLIP PROMPT --project {self.root}`")

    def check_version(self) -> None:
        """Refuse a project written by a newer tav (a damaged `project.json` is left to `state` to report)."""
        try:
            version = parse_json((self.root / STATE_FILE).read_bytes()).get("store_version", STORE_VERSION)
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(version, int) and version > STORE_VERSION:
            raise TavError(
                f"project {self.root} was written by a newer tav (store version {version}; this tav reads "
                f"{STORE_VERSION})",
                "upgrade tavcli (pip install -U tavcli) or use another --project",
            )

    def update_state(self, **changes: Any) -> None:
        """Read-modify-write `project.json` under the project lock, so concurrent updates are not lost."""
        self.check_version()
        with self.lock("project"):
            write_json(self.root / STATE_FILE, {**self.state, "store_version": STORE_VERSION, **changes})


def _hold_use(path: Path) -> bool:
    """Take (or count one more hold of) this process's use lock `path`; False where it cannot be made."""
    with _uses_guard:
        if path in _uses:
            _uses[path][1] += 1
            return True
        file_lock = FileLock(str(path), thread_local=False)
        try:
            file_lock.acquire(timeout=0)  # named after this process: only a dead one could have held it
        except OSError:  # a read-only project: nothing can remove anything from it either
            return False
        _uses[path] = [file_lock, 1]
        return True


def _release_use(path: Path) -> None:
    """Drop one hold of a use lock; the last one releases it and deletes its file."""
    with _uses_guard:
        _uses[path][1] -= 1
        if _uses[path][1] == 0:
            _uses.pop(path)[0].release()
            with contextlib.suppress(OSError):
                path.unlink()


def _used_by(pids: list[int]) -> str:
    return f"is in use by a running tav command (process {', '.join(map(str, pids))})"


def _refused(kind: str, key: str, why: str) -> TavError:
    return TavError(f"{kind}/{key} {why}", "run it again when that command has finished")


def _state_problem(data: bytes) -> str | None:
    """Why the bytes of `project.json` are not a valid state, or None."""
    try:
        state = parse_json(data)
    except ValueError as error:
        return f"not JSON ({error})"
    if not isinstance(state, dict):
        return "not a JSON object"
    version = state.get("store_version", STORE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        return f"store_version is {version!r}, not an integer"
    for name in ("tune", "inversion"):
        if state.get(name) is not None and not (isinstance(state[name], str) and KEY.fullmatch(state[name])):
            return f"{name} is {state[name]!r}, not an entry key"
    return None
