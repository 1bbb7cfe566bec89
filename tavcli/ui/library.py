"""The Library tab: a project's entries as `tav ls` knows them, newest first, and `tav rm`, `tav verify` and
`tav gc` on them, with the store's own rules (an entry in use is refused, work in progress left alone).
Torch-free."""

from __future__ import annotations

from pathlib import Path

from tavcli.errors import TavError
from tavcli.files.sizes import human_size
from tavcli.store.housekeeping import fix, listing, problems
from tavcli.store.project import Project
from tavcli.store.removal import garbage_plan, removal_plan
from tavcli.workflow.keys import describe

__all__ = [
    "COLUMNS",
    "collect_garbage",
    "library_rows",
    "open_project",
    "remove_entry",
    "verify_entries",
]

COLUMNS = ["kind", "key", "what", "from", "size", "created", "current"]


def open_project(root: Path) -> Project:
    """The project at `root`, refused in one line when there is none (or a newer tav wrote it)."""
    if not root.is_dir():
        raise TavError(f"no project at {root}", "create one from a clip on the Project tab")
    project = Project(root)
    if not project.recognised:  # never served, nor its files collected as garbage
        raise TavError(f"{root} is a folder, but no tav project", "a project is the NAME.tav folder `tav tune` made")
    project.check_version()
    return project


def library_rows(project: Project) -> list[list[str]]:
    """One row per entry, newest first: kind, key, what it is (or its damage), what it was computed from, its
    size, when it was made, and whether `tav edit` uses it now."""
    rows = sorted(listing(project), key=lambda row: row.created or "", reverse=True)
    current = project.pointers()
    return [
        [
            row.kind,
            row.key,
            describe(row.kind, row.spec) if row.state == "complete" else row.state,
            row.parent or "",
            human_size(row.bytes),
            (row.created or "")[:16].replace("T", " "),
            "yes" if row.key in current else "",
        ]
        for row in rows
    ]


def remove_entry(project: Project, key: str) -> str:
    """`tav rm KEY --yes`: the entry and what was computed from it; one line of what went."""
    plan = removal_plan(project, [key])
    removed = plan.execute()
    names = ", ".join(f"{row.kind}/{row.key[:8]}" for row in removed)
    return f"removed {names} ({human_size(plan.expected_freed_size)})"


def verify_entries(project: Project) -> str:
    """`tav verify`: every entry's bytes and values; one line per damaged entry with the way out."""
    rows = listing(project)
    damaged = [(row, found) for row in rows if (found := problems(row))]
    lines = [f"{row.kind}/{row.key}: {'; '.join(found)} ({fix(project, row)})" for row, found in damaged]
    return "\n".join([f"{len(rows) - len(damaged)} of {len(rows)} entries ok", *lines])


def collect_garbage(project: Project, checkpoints: bool = False) -> str:
    """`tav gc --yes`: what nothing uses or can use; what a running command holds is left alone (named)."""
    plan = garbage_plan(project, checkpoints)
    left = [f"left alone: {row.kind}/{row.key[:8]} {why}" for row, why in plan.left]
    removed = plan.execute()
    return "\n".join([f"removed {len(removed)} entries ({human_size(plan.expected_freed_size)})", *left])
