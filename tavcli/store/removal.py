"""Removing from a project: what removing an entry deletes, in which order and under which lock, and the
`RemovalPlan` that `tav rm` and `tav gc` show, confirm and execute. What a project holds and what depends
on what is `tavcli.store.housekeeping`'s."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tavcli.errors import TavError
from tavcli.store import locks
from tavcli.store.entry import KEY
from tavcli.store.housekeeping import Listing, dependents, held, listing, match, renders, sort_garbage
from tavcli.store.project import Project

__all__ = ["RemovalPlan", "garbage_plan", "removal_files", "removal_plan", "remove"]


def removal_files(project: Project, row: Listing) -> list[Path]:
    """Every file and folder that removing `row` deletes: the entry's files, and renders and grids of edits."""
    if row.kind == "render":
        render = next((r for r in renders(project) if r.sidecar == row.path), None)
        return [p for p in render.files if p.exists()] if render else [row.path]
    files = sorted(p for p in row.path.rglob("*") if p.is_file()) if row.path.is_dir() else [row.path]
    if row.kind == "edits":
        files += [path for render in renders(project) if row.key in render.edits for path in render.files]
    return [path for path in files if path.exists()]


def remove(project: Project, row: Listing) -> None:
    """Remove references before payloads: pointers, then `meta.json` (the entry stops counting), then files.

    An entry a live process computes or uses is refused in one line (`locks.removing`): a command may
    hold one for hours, and removing it under the command would break it or leave an orphan.
    """
    if row.kind == "render":
        _remove_render(project, row.path)
        return
    if row.kind in ("temp", "project"):
        shutil.rmtree(row.path) if row.path.is_dir() else row.path.unlink(missing_ok=True)
        return
    with locks.removing(project.root, row.kind, row.key):
        if KEY.fullmatch(row.key) and project.state_problem() is None:
            state = project.state
            pointers = {name: None for name in ("tune", "inversion") if state.get(name) == row.key}
            if pointers:
                project.update_state(**pointers)
        if row.kind == "edits":
            for render in renders(project):
                if row.key in render.edits:
                    _remove_render(project, render.sidecar)
        (row.path / "meta.json").unlink(missing_ok=True)
    shutil.rmtree(row.path, ignore_errors=True)


@dataclass(frozen=True)
class RemovalPlan:
    """What a removal takes, decided before anything goes: shown, confirmed, then executed (like
    huggingface_hub's `DeleteCacheStrategy`). `rows` go in order, children first; `left` is what `tav gc`
    would take but leaves alone because a live process holds it (with why)."""

    project: Project
    rows: tuple[Listing, ...]
    left: tuple[tuple[Listing, str], ...] = ()

    @property
    def expected_freed_size(self) -> int:
        """The bytes the rows hold (what `tav rm` and `tav gc` report as freed)."""
        return sum(row.bytes for row in self.rows)

    def files(self, row: Listing) -> list[Path]:
        """Every file and folder removing `row` deletes (see `removal_files`)."""
        return removal_files(self.project, row)

    def execute(self, on_removed: Callable[[Listing], None] | None = None) -> list[Listing]:
        """Remove the rows in order with `remove` (its rules and locks); return those removed.

        `on_removed` hears of each row as it goes, so what went before a refusal is still reported. A row a
        live process took up since the plan was made is refused in one line (`locks.removing`).
        """
        done = []
        for row in self.rows:
            remove(self.project, row)
            done.append(row)
            if on_removed is not None:
                on_removed(row)
        return done


def removal_plan(project: Project, given: list[str]) -> RemovalPlan:
    """What `tav rm` removes: the rows `given` names (key prefixes or KIND/KEY) and everything computed
    from them; refused in one line, before anything goes, if a live process holds any of it."""
    plan = dependents(project, [match(listing(project), name) for name in given])
    for row in plan:  # refused rather than waited for: a running tune or batch may hold an entry for hours
        why = held(project, row)
        if why is not None:
            hint = "run `tav rm` again when it has finished"
            raise TavError(f"{row.kind}/{row.key} {why}: nothing was removed", hint)
    return RemovalPlan(project, tuple(plan))


def garbage_plan(project: Project, checkpoints: bool = False) -> RemovalPlan:
    """What `tav gc` removes (see `garbage`), and what it leaves alone because a live process holds it."""
    rows, left = sort_garbage(project, checkpoints)
    return RemovalPlan(project, tuple(rows), tuple(left))


def _remove_render(project: Project, sidecar: Path) -> None:
    render = next((r for r in renders(project) if r.sidecar == sidecar), None)
    files = list(render.files) if render else [sidecar]
    sidecar.unlink(missing_ok=True)  # the reference first
    for path in files:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
