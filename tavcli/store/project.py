"""The project directory: a content-addressed cache of everything `tav` computes for one clip.

`CLIP.tav/` holds one folder per entry kind (`latents/`, `embeddings/`, `tunes/`, `inversions/`,
`edits/`), each entry `KIND/KEY/` (see `tavcli.store.entry`), and `project.json` naming the tune and
inversion `tav edit` uses now (layout: docs/store.md). `KEY` is a hash of the entry's spec (every
input that determines it) and `METHOD_VERSION`. This module owns the keys, `produce` (each entry computed
once, under its lock) and `project.json`; the lock protocol itself is `tavcli.store.locks`'s.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.atomic import create_json, write_json
from tavcli.files.reading import parse_json
from tavcli.store import locks
from tavcli.store.entry import KEY, Entry, noun
from tavcli.store.locks import BUSY

__all__ = ["BUSY", "METHOD_VERSION", "STORE_VERSION", "STATE_FILE", "Project", "cache_key"]

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

    def entry(self, kind: str, spec: Mapping[str, Any]) -> Entry:
        """Entry `kind/KEY` for `spec`: where a spec becomes a key (`cache_key` of the kind and the spec).

        The spec must name every input that determines the entry (built in `tavcli.workflow.keys`), so equal
        inputs find the same folder and any change finds another. Nothing is read or written here.
        """
        key = cache_key({"kind": kind, **spec})
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec=dict(spec))

    def at(self, kind: str, key: str) -> Entry:
        """Entry `kind/key` by its key alone, its spec unread (for what needs only its place)."""
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec={})

    def find(self, kind: str, key: str) -> Entry:
        """Entry `kind/key` with the spec its `meta.json` records (for following a key to what it holds).

        Refuses in one line an entry that is not complete (no `meta.json`: never computed, interrupted or
        removed) and, through `Entry.meta`, one whose `meta.json` is damaged or lists no payload.
        """
        entry = self.at(kind, key)
        if not entry.complete:
            raise TavError(f"project {self.root} has no complete {kind[:-1]} {key}", "run `tav tune` again")
        return Entry(kind=kind, key=key, path=entry.path, spec=entry.meta()["spec"])

    @property
    def recognised(self) -> bool:
        """Whether the folder holds a tav project: its `project.json`, or a clip's latents (a project's first
        entry). A front end that serves or cleans a folder asks first (the app opens no other folder)."""
        return (self.root / STATE_FILE).is_file() or bool(self.complete_keys("latents"))

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

    def _parent(self, entry: Entry) -> Entry | None:
        if entry.parent is None:
            return None
        return self.at(*entry.parent)

    # --- locks (the protocol is `tavcli.store.locks`'s; these keep the project's own calls short) -----------

    def lock(
        self, name: str, wait: bool = True, quiet: bool = False, optional: bool = False
    ) -> AbstractContextManager[bool]:
        """Lock `name` in this project, telling `on_wait` when it is busy (see `locks.lock`)."""
        return locks.lock(self.root, name, wait=wait, quiet=quiet, optional=optional, on_wait=self.on_wait)

    def busy(self, name: str) -> bool:
        """Whether a live process holds lock `name` right now (see `locks.busy`)."""
        return locks.busy(self.root, name)

    def using(self, entries: Iterable[Entry], doing: str = "this command") -> AbstractContextManager[None]:
        """Hold `entries` in use while the block runs: `tav rm` refuses them, `tav gc` leaves them (see
        `locks.using`)."""
        return locks.using(self.root, entries, doing)

    # --- state ------------------------------------------------------------------------------------------

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
