"""`tav batch`: many tune/invert/edit jobs from a TOML or JSON Lines file (the work is `tavcli.batch`'s)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from tavcli.cli import output, setup
from tavcli.cli.options import AllowPickleOpt, DeviceOpt, ModelConfigOpt, ModelOpt, PrecisionOpt, QuietOpt
from tavcli.errors import TavError
from tavcli.settings.config import Setting, project_for_clip

if TYPE_CHECKING:
    from tavcli.batch import BatchContext, Job, JobProblem

__all__ = ["batch"]


def _print_schema(value: bool) -> None:
    if value:
        from tavcli.batch import job_file_schema

        output.print_record(job_file_schema())
        raise typer.Exit()


def batch(
    jobs_file: Annotated[
        str, typer.Argument(metavar="FILE", help="Jobs: a .toml file, a .jsonl file, or - for JSON Lines on stdin.")
    ],
    keep_going: Annotated[
        bool, typer.Option("--keep-going", "-k", help="Run the valid jobs when some are invalid or fail.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what is cached and what would run; compute nothing.")
    ] = False,
    root: Annotated[
        Optional[Path],
        typer.Option(
            "--root",
            metavar="PATH",
            help="Confine every write of the batch (projects, outputs) to this folder: for job files you did "
            "not write yourself.",
            show_default=False,
        ),
    ] = None,
    schema: Annotated[
        bool,
        typer.Option(
            "--schema",
            help="Print the JSON Schema of job files (for editors and CI) and exit.",
            callback=_print_schema,
            is_eager=True,
            expose_value=False,
        ),
    ] = False,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run many tune/invert/edit jobs from a TOML file ([[job]] tables) or JSON Lines.

    Every job is checked before any work starts. Work shared by jobs (one clip tuned once, one model
    loaded once) is done once. stdout gets one JSON object per artifact or failed job; the exit
    status is 0 only if every job succeeded. Under `accelerate launch` the jobs are split across
    the processes, one device each. See docs/batch.md.

    Examples:

      tav batch jobs.toml

      cat jobs.jsonl | tav batch - --root ./out

      tav batch --schema > tav-jobs.schema.json
    """
    from tavcli.batch import BatchContext, Tally, assign, batch_slot, failure_record, finish, settle_current_tunes

    chosen = setup.settings(None, model=model, model_config=model_config, device=device, precision=precision)
    context = BatchContext(
        model=chosen["model"].value or "",
        model_config=chosen["model_config"].value,
        project_for=project_for_clip(None, chosen),
        root=root,
    )
    jobs, problems = _valid_jobs(jobs_file, context, keep_going)
    with batch_slot(chosen["device"].value or "auto") as slot:  # its process groups ended however this ends
        chosen["device"] = Setting(slot.device, chosen["device"].source)
        session = setup.session(chosen, allow_pickle)
        mine = assign(jobs, slot.index, slot.count)
        if slot.count > 1:
            output.show(
                f"[dim]process {slot.index + 1} of {slot.count} on {slot.device}: {len(mine)} of {len(jobs)} jobs[/dim]"
            )
        tally = Tally(output.print_record)  # what this process's records say, for the end of the batch
        if slot.index == 0:
            for problem in problems:
                tally(failure_record(problem))
        (_plan if dry_run else _run)(session, mine, keep_going, tally)
        whole = finish(slot, tally)  # every process waits here for the others: a launcher stops all at one's error
    if slot.index != 0:
        return  # the main process speaks for the batch
    settle_current_tunes(session, jobs, whole.tunes)
    if whole.failed:
        raise TavError(
            f"{len(whole.failed)} of {len(jobs) + len(problems)} jobs {'would fail' if dry_run else 'failed'}",
            "their records on stdout say why",
        )


def _valid_jobs(jobs_file: str, context: BatchContext, keep_going: bool) -> tuple[list[Job], list[JobProblem]]:
    """The file's valid jobs and the problems of the others, each shown; with any, only `keep_going` goes on."""
    from tavcli.batch import check_frames, parse_jobs, read_jobs

    jobs, problems = parse_jobs(*read_jobs(jobs_file), context, check=check_frames)  # clips read as `tav tune` does
    for problem in problems:
        output.show(f"[bold red]invalid job:[/bold red] {escape(str(problem))}")
    if problems and not keep_going:
        raise TavError(
            f"{len(problems)} of {len(jobs) + len(problems)} jobs are invalid; nothing was run",
            "fix them, or pass --keep-going to run the valid ones",
        )
    return jobs, problems


def _run(session: Any, jobs: list[Job], keep_going: bool, emit: Callable[[dict[str, Any]], None]) -> None:
    from tavcli.batch import run_jobs

    run_jobs(session, jobs, keep_going, emit)


def _plan(session: Any, jobs: list[Job], keep_going: bool, emit: Callable[[dict[str, Any]], None]) -> None:
    """The plan's records, and its table on stderr (a job that cannot be planned has its failure record)."""
    from tavcli.batch import plan_jobs

    rows: list[dict[str, Any]] = []

    def planned(record: dict[str, Any]) -> None:
        emit(record)
        if "action" in record:
            rows.append(record)

    plan_jobs(session, jobs, keep_going, planned)
    if rows:
        _show_plan(rows)


def _show_plan(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="plan", title_justify="left")
    for column in ("job", "step", "key", "action"):
        table.add_column(column)
    for row in rows:
        action = "[green]reuse[/green]" if row["cached"] else "[yellow]compute[/yellow]"
        if row.get("resume_from"):
            action += f" from step {row['resume_from']}"
        step = row["kind"] + (f": {escape(row['prompt'])}" if row.get("prompt") else "")
        table.add_row(escape(row["job"]), step, row["key"], action)
    output.show(table)
