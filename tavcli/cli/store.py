"""`tav ls`, `tav rm`, `tav gc`, `tav verify` and `tav config`: looking after a project and the settings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from tavcli.cli import output, setup
from tavcli.cli.options import DryRunOpt, JsonOpt, ProjectOpt, QuietOpt, YesOpt
from tavcli.errors import TavError
from tavcli.settings.config import PROJECT_FILE, Setting, as_dict, chosen_project, user_config_path

if TYPE_CHECKING:
    from tavcli.store.housekeeping import Listing
    from tavcli.store.removal import RemovalPlan

__all__ = ["collect_garbage", "list_store", "remove", "show_config", "verify"]


def list_store(project: ProjectOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the project's entries: what each is, what it was computed from, its size and date.

    Damaged entries (unreadable metadata, truncated payloads or checkpoints, a damaged project.json)
    are listed as damaged and never hide the rest; `tav verify` also checks every payload's bytes.

    Examples:

      tav ls -p skiing.tav

      tav ls -p skiing.tav --json | jq -r 'select(.kind == "edits") | .spec.prompt'
    """
    from rich import box
    from rich.table import Table

    from tavcli.store.housekeeping import listing

    store = setup.open_store(project)
    rows = listing(store)
    current = store.pointers()
    if output.records_wanted(as_json):
        for row in rows:
            output.print_record({**row.record(), "current": row.key in current})
    title = f"{store.root}  ({output.human_size(sum(r.bytes for r in rows))})"
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("kind", "key", "what", "from", "size", "created"):
        table.add_column(
            column,
            justify="right" if column == "size" else "left",
            no_wrap=column != "what",
            min_width=16 if column == "what" else None,
        )
    for row in rows:
        marker = "*" if row.key in current else ""
        what = escape(_what(row)) if row.state == "complete" else f"[red]{escape(row.state)}[/red]"
        parent = row.parent.split("/")[-1][:8] if row.parent else ""  # its kind shows in its own row
        created = (row.created or "")[5:16].replace("T", " ")
        table.add_row(row.kind, row.key[:8] + marker, what, parent, output.human_size(row.bytes), created)
    output.show(table)
    output.show("[dim]* the tune and inversion `tav edit` uses now[/dim]")


def remove(
    keys: Annotated[
        list[str], typer.Argument(help="Entry keys (a unique prefix is enough) or KIND/KEY.", metavar="KEY")
    ],
    project: ProjectOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove entries and everything computed from them (a tune's inversions, an inversion's null-text fits
    and edits, a fit's edits, and the edits' renders and grids), listing every file first.

    References go first: pointers and `meta.json`, then the payload, so an interrupted removal never
    leaves an entry that looks complete but is not. An entry a running tav command computes or uses
    (with everything computed from it) is refused, and nothing is removed.

    Example: tav rm -p skiing.tav tunes/3fe8 --dry-run
    """
    from tavcli.store.removal import removal_plan

    _carry_out(removal_plan(setup.open_store(project), keys), "remove", dry_run, yes)


def collect_garbage(
    project: ProjectOpt = None,
    checkpoints: Annotated[
        bool, typer.Option("--checkpoints", help="Also remove resumable training states (tunes stay usable).")
    ] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove what nothing uses or nothing can use: interrupted and damaged entries and checkpoints, entries
    whose source is gone, renders and grids of removed edits, a damaged project.json, stale temp files.

    Work a live process is doing, and entries a running command uses, are left alone (each named).

    Example: tav gc -p skiing.tav --checkpoints --dry-run
    """
    from tavcli.store.removal import garbage_plan

    _carry_out(garbage_plan(setup.open_store(project), checkpoints), "collect", dry_run, yes)


def verify(project: ProjectOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Check every entry and checkpoint: metadata, payload SHA-256, NaN or inf values, project.json.

    Exits with status 1 if anything is damaged or incomplete, naming the `tav rm`/`tav gc` that clears it.

    Example: tav verify -p skiing.tav
    """
    from tavcli.store.housekeeping import fix, listing, problems

    store = setup.open_store(project)
    rows = listing(store)
    records = output.records_wanted(as_json)
    bad = 0
    with output.progress("verifying", len(rows)) as advance:
        for row in rows:
            found = problems(row)
            bad += bool(found)
            if records:
                record = {"kind": row.kind, "key": row.key, "path": str(row.path), "ok": not found}
                output.print_record({**record, "problems": found, "fix": fix(store, row) if found else None})
            if found:
                line = f"{row.kind}/{row.key}: {escape('; '.join(found))} [dim]({fix(store, row)})[/dim]"
                output.show(f"[red]damaged[/red] {line}")
            advance()
    output.show(f"{len(rows) - bad} of {len(rows)} entries ok" + (f", [red]{bad} damaged[/red]" if bad else ""))
    if bad:
        raise typer.Exit(1)


def show_config(project: ProjectOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Show the effective settings and where each came from.

    Precedence: flag > environment (TAV_MODEL, TAV_DEVICE, TAV_PRECISION, TAV_PROJECT) > the project's
    tav.toml > the user's config.toml > default.

    Example: tav config --json
    """
    from rich import box
    from rich.table import Table

    chosen = chosen_project(project)
    project_dir = Path(chosen.value or "") if chosen else None
    effective = setup.settings(project_dir)
    files = {
        "user config": str(user_config_path()),
        "project config": str(project_dir / PROJECT_FILE) if project_dir else None,
    }
    if output.records_wanted(as_json):
        where = chosen and {"value": chosen.value, "source": chosen.source}
        output.print_record({**as_dict(effective), "project": where, "files": files})
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for key, setting in [*effective.items(), ("project", chosen or Setting(None, "none"))]:
        table.add_row(key, escape(str(setting.value)), escape(setting.source))
    output.show(table)
    for name, path in files.items():
        if path:
            exists = "" if Path(path).is_file() else " [dim](does not exist)[/dim]"
            output.show(f"{name}: {escape(path)}{exists}")


def _carry_out(plan: RemovalPlan, verb: str, dry_run: bool, yes: bool) -> None:
    """Show the plan: what is left alone, what goes, every file of it, and the bytes it frees; then (after
    --yes or a confirmation) execute it, one record per row removed."""
    for row, why in plan.left:  # never waited for: a running command may hold it for hours
        output.show(f"[dim]left alone: {row.kind}/{row.key} {escape(why)}[/dim]")
    rows = plan.rows
    for row in rows:
        why = _what(row) if row.state == "complete" else row.state
        output.show(f"  {row.kind}/{row.key}  {output.human_size(row.bytes):>9}  [dim]{escape(why)}[/dim]")
        for path in plan.files(row):
            output.show(f"      [dim]{escape(str(path))}[/dim]")
    freed = output.human_size(plan.expected_freed_size)
    plural = "entry" if len(rows) == 1 else "entries"
    output.show(f"{'would free' if dry_run else 'frees'} {freed} in {len(rows)} {plural}")
    if dry_run or not rows:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise TavError("not confirmed: nothing was removed", f"pass --yes to {verb} without asking")
        typer.confirm(f"{verb.capitalize()} {len(rows)} entries?", abort=True)
    plan.execute(on_removed=_report_removed)


def _report_removed(row: Listing) -> None:
    output.print_record({"removed": f"{row.kind}/{row.key}", "path": str(row.path), "bytes": row.bytes})


def _what(row: Listing) -> str:
    from tavcli.workflow.keys import describe

    return describe(row.kind, row.spec)
