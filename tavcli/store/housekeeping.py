"""Looking after a project: what it holds (damage included), what a removal takes with it, what `tav gc`
may remove (removing it is `tavcli.store.removal`'s).
Nothing here raises on a damaged store: damage is listed, never fatal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.store import locks
from tavcli.store.checkpoints import Checkpoints
from tavcli.store.entry import KINDS, PARENTS, Entry, timestamp
from tavcli.store.project import STATE_FILE, Project
from tavcli.store.sidecar import edit_keys, output_files, read_sidecar

__all__ = [
    "Listing",
    "Render",
    "dependents",
    "fix",
    "garbage",
    "held",
    "listing",
    "match",
    "pid_alive",
    "problems",
    "renders",
    "sort_garbage",
]

# The deepest kind each kind of row can be computed from (the entries' parents are the store's), for removing
# children first.
ROW_PARENTS = {
    **{kind: parents[0][1] for kind, parents in PARENTS.items()},
    "checkpoints": "latents",
    "render": "edits",
}


@dataclass
class Listing:
    """One row of `tav ls`: an entry, checkpoint folder, render or damaged file, and what is known about it."""

    kind: str
    key: str
    path: Path
    state: str  # complete, incomplete, or "damaged: why"
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

    @property
    def damaged(self) -> bool:
        return self.state.startswith("damaged")


@dataclass(frozen=True)
class Render:
    """An output in the project's `renders/` folder: its sidecar, the edits it shows, its files."""

    sidecar: Path
    edits: tuple[str, ...]
    files: tuple[Path, ...]


def listing(project: Project) -> list[Listing]:
    """Every entry and checkpoint folder in the project, and `project.json` if it is damaged."""
    rows = []
    for kind in KINDS:
        for path in sorted(p for p in (project.root / kind).glob("*") if p.is_dir() and not p.name.startswith(".")):
            rows.append(_list_entry(Entry(kind, path.name, path, {})))
    for folder in sorted(p for p in (project.root / "checkpoints").glob("*") if p.is_dir()):
        rows.append(_list_checkpoints(folder))
    problem = project.state_problem()
    if problem:
        path = project.root / STATE_FILE
        rows.append(Listing("project", STATE_FILE, path, f"damaged: {problem}", _path_bytes(path)))
    return rows


def _list_entry(bare: Entry) -> Listing:
    size = _path_bytes(bare.path)
    if not bare.complete:
        return Listing(bare.kind, bare.key, bare.path, "incomplete", size)
    found = bare.quick_problems()
    if found:
        return Listing(bare.kind, bare.key, bare.path, f"damaged: {'; '.join(found)}", size)
    meta = bare.meta()
    entry = Entry(bare.kind, bare.key, bare.path, meta["spec"])
    parent = "/".join(entry.parent) if entry.parent else None
    return Listing(entry.kind, entry.key, entry.path, "complete", size, meta.get("created"), entry.spec, parent)


def _list_checkpoints(folder: Path) -> Listing:
    checkpoints = Checkpoints(folder)
    steps = checkpoints.steps()
    spec: dict[str, Any] = {"steps": steps}
    parent, state = None, "complete" if steps else "incomplete"
    found = checkpoints.problems()
    if found:
        state = f"damaged: {'; '.join(found)}"
    elif steps:
        try:
            spec.update(checkpoints.run())
            # A tune's training run comes from latents; a null-text fit's from its inversion.
            parent = f"latents/{spec['latents']}" if "latents" in spec else f"inversions/{spec['inversion']}"
        except (ValueError, KeyError) as error:
            state = f"damaged: {error}"
    modified = max((p.stat().st_mtime for p in folder.iterdir()), default=None)
    created = timestamp(modified) if modified else None
    return Listing("checkpoints", folder.name, folder, state, _path_bytes(folder), created, spec, parent)


def renders(project: Project) -> list[Render]:
    """The outputs in `renders/` with a readable sidecar (edits and grids)."""
    found = []
    for sidecar in sorted((project.root / "renders").glob("*.json")):
        try:
            record = read_sidecar(sidecar)
            render = Render(sidecar, tuple(edit_keys(record)), tuple(output_files(sidecar, record)))
        except (TavError, KeyError, TypeError, AttributeError):
            continue  # not a sidecar tav can read: never listed, never removed
        found.append(render)
    return found


def match(rows: list[Listing], given: str) -> Listing:
    """The one row a key prefix (or `KIND/KEY`) names; one line listing the candidates otherwise."""
    kind, _, key = given.rpartition("/")
    found = [r for r in rows if r.key.startswith(key) and (not kind or r.kind == kind)]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries ({', '.join(f'{r.kind}/{r.key}' for r in found)})"
        raise TavError(f"{what} match {given!r}", "see `tav ls` for the keys; give more digits or KIND/KEY")
    return found[0]


def problems(row: Listing) -> list[str]:
    """Everything wrong with a row (`tav verify`): what listing found, else its payloads' hashes and values."""
    if row.state != "complete":
        return [row.state.removeprefix("damaged: ")]
    if row.kind == "checkpoints":
        return Checkpoints(row.path).problems(full=True)
    return Entry(row.kind, row.key, row.path, row.spec).problems()


def fix(project: Project, row: Listing) -> str:
    """The command that clears a damaged row."""
    if row.kind == "project":
        return f"`tav gc -p {project.root}` removes it; it is then rebuilt from the entries"
    return f"`tav rm {row.kind}/{row.key} -p {project.root}` or `tav gc -p {project.root}` removes it"


def dependents(project: Project, targets: list[Listing]) -> list[Listing]:
    """`targets` and everything computed from them, children first (the order to remove in)."""
    rows = listing(project)
    chosen = {f"{t.kind}/{t.key}" for t in targets}
    grew = True
    while grew:
        extra = {f"{r.kind}/{r.key}" for r in rows if r.parent in chosen} - chosen
        grew = bool(extra)
        chosen |= extra
    picked = [r for r in rows if f"{r.kind}/{r.key}" in chosen]
    return sorted(picked, key=_removal_rank)


def held(project: Project, row: Listing) -> str | None:
    """Why a live process holds `row` (computing, writing or using it: `tav rm` refuses it, `tav gc` leaves
    it), or None."""
    if row.kind in KINDS:
        return locks.in_use(project.root, row.kind, row.key)
    if row.kind == "checkpoints" and locks.busy(project.root, f"checkpoints-{row.key}"):
        return "is being trained by a running tav command"
    return None


def garbage(project: Project, checkpoints: bool = False) -> list[Listing]:
    """What `tav gc` removes: interrupted and damaged entries, entries whose parent is gone, renders and grids
    of removed edits, a damaged `project.json`, temporary files of dead processes, and (if asked) the
    resumable checkpoints. Work a live process holds is left alone (`sort_garbage` says which)."""
    return sort_garbage(project, checkpoints)[0]


def sort_garbage(project: Project, checkpoints: bool = False) -> tuple[list[Listing], list[tuple[Listing, str]]]:
    """What `tav gc` removes, and what it would remove but leaves alone because a live process holds it
    (with why)."""
    found, left = [], []
    for row in _garbage(project, checkpoints):
        why = held(project, row)
        if why is None:
            found.append(row)
        else:
            left.append((row, why))
    return found, left


def _garbage(project: Project, checkpoints: bool) -> list[Listing]:
    """Everything `tav gc` collects, held or not."""
    rows = listing(project)
    present = {f"{r.kind}/{r.key}" for r in rows if r.state == "complete"}
    found = []
    for row in rows:
        if row.state == "incomplete":
            found.append(_with_state(row, "interrupted before it was complete"))
        elif row.damaged:
            found.append(row)
        elif row.parent and row.parent not in present:
            found.append(_with_state(row, f"computed from {row.parent}, which is gone"))
        elif row.kind == "checkpoints" and checkpoints:
            found.append(_with_state(row, "resumable training state (--checkpoints)"))
    edits = {r.key for r in rows if r.kind == "edits" and r.state == "complete"}
    for render in renders(project):
        gone = [key for key in render.edits if key not in edits]
        if gone:
            size = sum(_path_bytes(path) for path in render.files if path.exists())
            why = f"render of edits/{gone[0]}, which is gone"
            found.append(Listing("render", render.sidecar.name[:-5], render.sidecar, why, size))
    for temp in project.root.rglob(".*.tmp"):
        pid = temp.name.rsplit(".", 3)[-3]
        if pid.isdigit() and not pid_alive(int(pid)):
            found.append(Listing("temp", temp.name, temp, "left by a process that died", _path_bytes(temp)))
    return sorted(found, key=_removal_rank)


def _removal_rank(row: Listing) -> int:
    """Children before parents (the deepest computations first); project.json and temp files last."""

    def depth(kind: str) -> int:
        parent = ROW_PARENTS.get(kind)
        return 0 if parent is None else 1 + depth(parent)

    return 1 if row.kind in ("project", "temp") else -depth(row.kind)


def _with_state(row: Listing, state: str) -> Listing:
    return Listing(row.kind, row.key, row.path, state, row.bytes, row.created, row.spec, row.parent)


def _path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs here (a temp file named after a dead one is garbage)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
