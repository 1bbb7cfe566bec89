"""The project directory: a content-addressed cache of everything `tav` computes for one clip.

Layout (plain folders a person can read; see docs/store.md):

    CLIP.tav/
      project.json                  store version; which tune and inversion `tav edit` uses now
      latents/<key>/                the clip's VAE latent distribution (mean, std)
      embeddings/<key>/             CLIP text embeddings of prompts
      tunes/<key>/                  the tuned tensors (the delta)
      inversions/<key>/             the DDIM inversion trajectory
      edits/<key>/                  an edited clip's final latents
      <each>/meta.json              what determined it (`spec`), payload hashes, facts
      checkpoints/<run>/step-N.safetensors   resumable training state of a tune run
      renders/                      default output folder (videos + JSON sidecars)
      .locks/                       one lock file per artifact being computed

`key` is a hash of the entry's spec (every input that determines it) and `METHOD_VERSION`. An entry
is complete once its `meta.json` exists: payloads are written first, each atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tavcli.atomic import atomic_path, write_json
from tavcli.errors import TavError

__all__ = [
    "KINDS",
    "METHOD_VERSION",
    "STORE_VERSION",
    "TENSORS",
    "Checkpoints",
    "Entry",
    "Listing",
    "Project",
    "cache_key",
    "file_sha256",
]

# Bump when a change to the method changes what an entry holds: old entries then stop matching.
METHOD_VERSION = 1
# Bump when the layout changes: an older tav refuses a newer project instead of misreading it.
STORE_VERSION = 1
TENSORS = "tensors.safetensors"
KINDS = ("latents", "embeddings", "tunes", "inversions", "edits")
# kind -> (the spec field naming its parent's key, the parent's kind)
PARENTS = {"tunes": ("latents", "latents"), "inversions": ("tune", "tunes"), "edits": ("inversion", "inversions")}


def cache_key(spec: dict[str, Any]) -> str:
    """A short, stable hash of `spec` (JSON-serialisable) and the method version."""
    canonical = json.dumps({"method": METHOD_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged(path: Path, why: object) -> TavError:
    hint = f"`tav rm {path.parent.name}/{path.name} -p {path.parent.parent}`, then run again"
    return TavError(f"damaged cache entry {path}: {why}", hint)


@dataclass(frozen=True)
class Entry:
    """One cached artifact: a folder holding payload files and, once complete, `meta.json`."""

    kind: str
    key: str
    path: Path
    spec: dict[str, Any]

    @property
    def complete(self) -> bool:
        return (self.path / "meta.json").is_file()

    @property
    def parent(self) -> tuple[str, str] | None:
        """(kind, key) of the entry this one was computed from."""
        if self.kind not in PARENTS or self.spec.get(PARENTS[self.kind][0]) is None:
            return None
        field_name, kind = PARENTS[self.kind]
        return kind, self.spec[field_name]

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as error:
            raise _damaged(self.path, error) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
            raise _damaged(self.path, "meta.json has no spec")
        return meta

    def save(self, tensors: dict[str, Any], facts: dict[str, Any]) -> None:
        """Write the tensors, then the metadata (with the payload's hash) that marks the entry complete."""
        from safetensors.torch import save

        payload = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path / TENSORS, needed=len(payload)) as temp:
            temp.write_bytes(payload)
        files = {TENSORS: {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}
        write_json(
            self.path / "meta.json",
            {"kind": self.kind, "key": self.key, "spec": self.spec, "files": files, "created": _now(), **facts},
        )

    def tensors(self, device: Any = "cpu") -> dict[str, Any]:
        """The payload, checked against the SHA-256 recorded when it was written: a damaged one is refused."""
        from safetensors.torch import load

        try:
            payload = (self.path / TENSORS).read_bytes()
            recorded = self.meta().get("files", {}).get(TENSORS, {}).get("sha256")
            if recorded is not None and hashlib.sha256(payload).hexdigest() != recorded:
                raise ValueError("its payload does not match the SHA-256 recorded when it was written")
            return {name: t.to(device) for name, t in load(payload).items()}
        except (OSError, ValueError) as error:
            raise _damaged(self.path, error) from None

    def problems(self) -> list[str]:
        """What is wrong with this complete entry's files (empty when its payload hashes match)."""
        try:
            files = self.meta().get("files", {})
        except TavError as error:
            return [error.message]
        found = []
        for name, recorded in files.items():
            path = self.path / name
            if not path.is_file():
                found.append(f"{name} is missing")
            elif file_sha256(path) != recorded.get("sha256"):
                found.append(f"{name} does not match its recorded SHA-256")
        return found


@dataclass
class Listing:
    """One row of `tav ls`: an entry (or checkpoint folder) and what is known about it, never raising."""

    kind: str
    key: str
    path: Path
    state: str  # complete, incomplete, or damaged: why
    bytes: int
    created: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # "kind/key"

    def record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "path": str(self.path),
            "state": self.state,
            "bytes": self.bytes,
            "created": self.created,
            "parent": self.parent,
            "spec": self.spec,
        }


class Checkpoints:
    """Resumable training states of one tune run (a tune's inputs except its step count).

    One self-describing safetensors file per saved step: a run that ends at 500 steps keeps
    `step-00000500`, so asking for 800 steps later continues from it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = folder.name

    def steps(self) -> list[int]:
        found = []
        for path in self.folder.glob("step-*.safetensors"):
            try:
                found.append(int(path.name[5:-12]))
            except ValueError:
                continue
        return sorted(found)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.safetensors"

    def latest_step(self, at_most: int) -> int | None:
        """The most steps of a saved state not beyond `at_most`."""
        usable = [step for step in self.steps() if step <= at_most]
        return usable[-1] if usable else None

    def latest(self, at_most: int) -> Path | None:
        """The checkpoint with the most steps not beyond `at_most`."""
        step = self.latest_step(at_most)
        return None if step is None else self.path(step)

    def save(self, step: int, payload: bytes) -> Path:
        with atomic_path(self.path(step), needed=len(payload)) as temp:
            temp.write_bytes(payload)
        return self.path(step)

    def discard(self, steps: list[int]) -> None:
        for step in steps:
            self.path(step).unlink(missing_ok=True)


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

    def checkpoints(self, run_spec: dict[str, Any]) -> Checkpoints:
        return Checkpoints(self.root / "checkpoints" / cache_key({"kind": "checkpoints", **run_spec}))

    def produce(self, entry: Entry, compute: Callable[[], None], force: bool = False, lock: str | None = None) -> bool:
        """Make sure `entry` exists, computing it under its lock unless present; return whether it was cached.

        Checking again after taking the lock means two processes never compute the same entry twice.
        """
        if entry.complete and not force:
            return True
        with self.lock(lock or f"{entry.kind}-{entry.key}"):
            if entry.complete and not force:
                return True
            compute()
        return False

    # --- locks and state ------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive OS file lock, released by the kernel if its holder dies (so no stale locks)."""
        self.check_version()
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
        path = self.root / "project.json"
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TavError(f"damaged {path}: {error}", "delete it; the entries stay usable") from None
        return state if isinstance(state, dict) else {}

    def check_version(self) -> None:
        version = self.state.get("store_version", STORE_VERSION)
        if not isinstance(version, int) or version > STORE_VERSION:
            raise TavError(
                f"project {self.root} was written by a newer tav (store version {version}; this tav reads "
                f"{STORE_VERSION})",
                "upgrade tavcli (pip install -U tavcli) or use another --project",
            )

    def update_state(self, **changes: Any) -> None:
        """Read-modify-write `project.json` under the project lock, so concurrent updates are not lost."""
        with self.lock("project"):
            write_json(self.root / "project.json", {**self.state, "store_version": STORE_VERSION, **changes})

    # --- inspecting and pruning --------------------------------------------------------------------

    def listing(self) -> list[Listing]:
        """Every entry and checkpoint in the project, damaged ones included."""
        rows = []
        for kind in KINDS:
            for path in sorted(p for p in (self.root / kind).glob("*") if p.is_dir() and not p.name.startswith(".")):
                rows.append(self._list_entry(Entry(kind, path.name, path, {})))
        for folder in sorted(p for p in (self.root / "checkpoints").glob("*") if p.is_dir()):
            rows.append(_list_checkpoints(folder))
        return rows

    def _list_entry(self, bare: Entry) -> Listing:
        size = _folder_bytes(bare.path)
        if not bare.complete:
            return Listing(bare.kind, bare.key, bare.path, "incomplete", size)
        try:
            meta = bare.meta()
        except TavError as error:
            return Listing(bare.kind, bare.key, bare.path, f"damaged: {error.message}", size)
        entry = Entry(bare.kind, bare.key, bare.path, meta["spec"])
        parent = "/".join(entry.parent) if entry.parent else None
        return Listing(entry.kind, entry.key, entry.path, "complete", size, meta.get("created"), entry.spec, parent)

    def renders(self) -> list[tuple[Path, str]]:
        """Outputs inside the project (`renders/`) and the edit key each was rendered from."""
        found = []
        for sidecar in sorted((self.root / "renders").glob("*.json")):
            try:
                key = json.loads(sidecar.read_text())["edit"]["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            found.append((sidecar, key))
        return found

    def dependents(self, targets: list[Listing]) -> list[Listing]:
        """`targets` and everything computed from them, children first (the order to remove in)."""
        rows = self.listing()
        chosen = {f"{t.kind}/{t.key}" for t in targets}
        grew = True
        while grew:
            extra = {f"{r.kind}/{r.key}" for r in rows if r.parent in chosen} - chosen
            grew = bool(extra)
            chosen |= extra
        order = {kind: i for i, kind in enumerate(("edits", "inversions", "tunes", "checkpoints", "embeddings"))}
        picked = [r for r in rows if f"{r.kind}/{r.key}" in chosen]
        return sorted(picked, key=lambda r: order.get(r.kind, len(order)))

    def garbage(self, checkpoints: bool = False) -> list[Listing]:
        """What `tav gc` removes: interrupted entries, entries whose parent is gone, renders of removed edits,
        temporary files of dead processes, and (if asked) the resumable checkpoints."""
        rows = self.listing()
        present = {f"{r.kind}/{r.key}" for r in rows if r.state == "complete"}
        found = []
        for row in rows:
            if row.state == "incomplete" and not self.busy(f"{row.kind}-{row.key}"):
                found.append(_with_state(row, "interrupted before it was complete"))
            elif row.parent and row.parent not in present and row.state == "complete":
                found.append(_with_state(row, f"computed from {row.parent}, which is gone"))
            elif row.kind == "checkpoints" and checkpoints and not self.busy(f"checkpoints-{row.key}"):
                found.append(_with_state(row, "resumable training state (--checkpoints)"))
        edits = {r.key for r in rows if r.kind == "edits" and r.state == "complete"}
        for sidecar, key in self.renders():
            if key not in edits:
                found.append(Listing("render", sidecar.name[:-5], sidecar, f"render of edits/{key}, which is gone", 0))
        for temp in self.root.rglob(".*.tmp"):
            pid = temp.name.rsplit(".", 3)[-3]
            if pid.isdigit() and not pid_alive(int(pid)):
                found.append(Listing("temp", temp.name, temp, "left by a process that died", _path_bytes(temp)))
        return found

    def remove(self, row: Listing) -> None:
        """Remove references before payloads: pointers, then `meta.json` (the entry stops counting), then files."""
        if row.kind == "render":
            _remove_render(row.path)
            return
        if row.kind == "temp":
            shutil.rmtree(row.path) if row.path.is_dir() else row.path.unlink(missing_ok=True)
            return
        with self.lock(f"{row.kind}-{row.key}"):
            state = self.state
            pointers = {name: None for name in ("tune", "inversion") if state.get(name) == row.key}
            if pointers:
                self.update_state(**pointers)
            if row.kind == "edits":
                for sidecar, key in self.renders():
                    if key == row.key:
                        _remove_render(sidecar)
            (row.path / "meta.json").unlink(missing_ok=True)
            shutil.rmtree(row.path, ignore_errors=True)


def _list_checkpoints(folder: Path) -> Listing:
    from safetensors import safe_open

    steps = Checkpoints(folder).steps()
    spec: dict[str, Any] = {"steps": steps}
    parent = None
    state = "complete" if steps else "incomplete"
    if steps:
        try:
            with safe_open(str(Checkpoints(folder).path(steps[-1])), "pt") as file:
                run = json.loads((file.metadata() or {})["run"])
            spec.update(run)
            parent = f"latents/{run['latents']}"
        except (OSError, ValueError, KeyError, TypeError) as error:
            state = f"damaged: {error}"
    modified = max((p.stat().st_mtime for p in folder.iterdir()), default=None)
    created = _now(modified) if modified else None
    return Listing("checkpoints", folder.name, folder, state, _folder_bytes(folder), created, spec, parent)


def _remove_render(sidecar: Path) -> None:
    output = sidecar.with_name(sidecar.name[: -len(".json")])
    sidecar.unlink(missing_ok=True)  # the reference first
    if output.is_dir():
        shutil.rmtree(output, ignore_errors=True)
    else:
        output.unlink(missing_ok=True)


def _with_state(row: Listing, state: str) -> Listing:
    return Listing(row.kind, row.key, row.path, state, row.bytes, row.created, row.spec, row.parent)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _path_bytes(path: Path) -> int:
    return _folder_bytes(path) if path.is_dir() else path.stat().st_size


def _now(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs here (a temp file named after a dead one is garbage)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
