"""The project directory: a content-addressed cache of everything `tav` computes for one clip.

`CLIP.tav/` holds one folder per entry kind (`latents/`, `embeddings/`, `tunes/`, `inversions/`,
`edits/`), each entry `KIND/KEY/` (see `tavcli.entry`), and `project.json` naming the tune and
inversion `tav edit` uses now (layout: docs/store.md). `KEY` is a hash of the entry's spec (every
input that determines it) and `METHOD_VERSION`. Locks make concurrent runs compute each entry once.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tavcli.atomic import create_json, write_json
from tavcli.entry import KEY, Entry
from tavcli.errors import TavError

__all__ = ["METHOD_VERSION", "STORE_VERSION", "STATE_FILE", "Project", "cache_key"]

# Bump when a change to the method changes what an entry holds: old entries then stop matching.
METHOD_VERSION = 1
# Bump when the layout changes: an older tav refuses a newer project instead of misreading it.
STORE_VERSION = 1
STATE_FILE = "project.json"


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

    def entry(self, kind: str, spec: dict[str, Any]) -> Entry:
        key = cache_key({"kind": kind, **spec})
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec=spec)

    def find(self, kind: str, key: str) -> Entry:
        path = self.root / kind / key
        entry = Entry(kind=kind, key=key, path=path, spec={})
        if not entry.complete:
            raise TavError(f"project {self.root} has no complete {kind[:-1]} {key}", "run `tav tune` again")
        return Entry(kind=kind, key=key, path=path, spec=entry.meta()["spec"])

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
            compute()
        return False

    # --- locks and state ------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive OS file lock, released by the kernel if its holder dies (so no stale locks)."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        file_lock = FileLock(str(folder / f"{name}.lock"), thread_local=False)
        try:
            file_lock.acquire(timeout=0)
        except Timeout:
            self.on_wait(f"waiting for another tav process working on {name} in {self.root}")
            file_lock.acquire()
        try:
            yield
        finally:
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
            text = path.read_text()
        except FileNotFoundError:
            return self._rebuilt_state()
        except OSError as error:
            raise TavError(f"cannot read {path}: {error.strerror}") from None
        problem = _state_problem(text)
        if problem:
            raise TavError(
                f"damaged {path}: {problem}",
                f"`tav gc -p {self.root}` removes it; it is then rebuilt from the entries",
            )
        return json.loads(text)

    def state_problem(self) -> str | None:
        """Why `project.json` is damaged, or None (also when it is missing: it is rebuilt then)."""
        try:
            return _state_problem((self.root / STATE_FILE).read_text())
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
                f"{self.root / STATE_FILE} does not say which of the project's {len(tunes)} tunes to use",
                "run the `tav tune` command of the one you want again (it is cached), or `tav rm` the others",
            )
        raise TavError(f"project {self.root} was never tuned", f"run `tav tune CLIP PROMPT --project {self.root}`")

    def check_version(self) -> None:
        """Refuse a project written by a newer tav (a damaged `project.json` is left to `state` to report)."""
        try:
            version = json.loads((self.root / STATE_FILE).read_text()).get("store_version", STORE_VERSION)
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


def _state_problem(text: str) -> str | None:
    """Why the text of `project.json` is not a valid state, or None."""
    try:
        state = json.loads(text)
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
