"""Running batch jobs: this process's share of them, in model order, each as `tav tune/invert/edit` runs it.

Jobs become the same requests the command line makes (`tavcli.settings.tuning`, `tavcli.settings.editing`) and
go through the same workflow, which plans them too: `plan_jobs` lists what `tavcli.workflow.planning` names,
computing nothing. Torch is imported only when work starts.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tavcli import workflow
from tavcli.batch.jobs import Job, JobProblem
from tavcli.errors import TavError, first_line, interruption
from tavcli.models.names import split_lora
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.config import DEFAULT_CLIP_MODEL
from tavcli.settings.declared import Names
from tavcli.settings.editing import EditRequest, FrameChoice
from tavcli.settings.options import EDIT, INVERT
from tavcli.settings.sampling import EditSettings, InversionSettings, control_spec
from tavcli.settings.tuning import FrameSelection, FrameSize, Preview, TuneRequest, TuneSettings, preview_choice

if TYPE_CHECKING:  # torch loads with the workflow's session, only when work starts
    from tavcli.workflow.session import Artifact, Session

__all__ = ["Emit", "failure_record", "plan_jobs", "run_jobs"]


Emit = Callable[[dict[str, Any]], None]


def run_jobs(session: Session, jobs: list[Job], keep_going: bool, emit: Emit) -> bool:
    """Run `jobs` in order, one base-model load per model; emit a record per artifact or failed job.

    Returns whether every job succeeded. Without `keep_going` the first failure stops the rest.
    """
    import time

    ordered = sorted(jobs, key=lambda job: job.model)  # stable: same-model jobs stay in file order
    ok = True
    for index, job in enumerate(ordered):
        started = time.perf_counter()
        stage = ["tune"]  # the step under way, named in a failure record
        try:
            for artifact in _job_artifacts(session, job, stage):
                emit({"job": job.name, **artifact.record(), "error": None})
        except Exception as error:  # any failure is the job's: it gets its record, and --keep-going goes on
            stopped = interruption(error)
            if stopped is not None:  # interrupted: stop everything, the tune is saved
                for made in getattr(stopped, "made", ()):  # a preview tune's kept states and previews
                    emit({"job": job.name, **made.record(), "error": None})
                raise
            emit(_failed(job, stage[0], error, time.perf_counter() - started))
            ok = False
            if not keep_going:
                return False
        following = ordered[index + 1] if index + 1 < len(ordered) else None
        if following is None or following.model != job.model:
            session.release(job.model)  # no later job needs it: free the memory
    return ok


def _failed(job: Job, stage: str, error: Exception, seconds: float) -> dict[str, Any]:
    """The failure record of `job` at `stage` (with TAV_DEBUG, its traceback on stderr: the batch goes on)."""
    if os.environ.get("TAV_DEBUG"):
        traceback.print_exc()
    return _failure(job.name, stage, _failure_message(error), seconds)


def _failure_message(error: Exception) -> str:
    """A failed job's error in one line: tav's own message, else the library's first line and its type."""
    if isinstance(error, TavError):
        return error.message if error.hint is None else f"{error.message} ({error.hint})"
    if isinstance(error, OSError):
        return str(error)
    return f"{type(error).__name__}: {first_line(error)}"


def failure_record(problem: JobProblem) -> dict[str, Any]:
    return _failure(problem.name, "job", str(problem), 0.0)


def _failure(name: str, kind: str, message: str, seconds: float) -> dict[str, Any]:
    return {
        "job": name,
        "kind": kind,
        "path": None,
        "key": None,
        "cached": False,
        "seconds": round(seconds, 3),
        "error": message,
    }


def _tune_request(job: Job, session: Session) -> TuneRequest:
    """The job's tune as `tav tune` would make it from the same options, by name (the model's own defaults for
    those the job leaves out)."""
    request = TuneRequest(
        clip=job.clip,
        prompt=job.prompt,
        project=job.project,
        model=job.model,
        selection=FrameSelection.named(job.tune),
        size=FrameSize.named(job.tune).snapped(session.reporter),
        settings=TuneSettings.named(job.tune),
    )
    defaulted: TuneRequest = workflow.with_model_defaults(session, request, given=set(job.tune))
    return defaulted


def _preview(job: Job) -> Preview | None:
    """The job's previews while tuning, as `tav tune --preview` asks for them (checked so at validation)."""
    preview = job.tune.get("preview"), job.tune.get("preview_every"), job.tune.get("preview_steps")
    return preview_choice(*preview, evaluate=job.tune.get("eval", False), names=Names(""))


def _edit_request(job: Job, tune_key: str) -> EditRequest:
    """The job's edits as `tav edit` would make them, of the job's tune (the workflow plans its inversion)."""
    edit = {name: job.edit.get(name, option.default) for name, option in EDIT.items()}
    return EditRequest(
        project=job.project,
        prompts=list(job.edits),
        settings=EditSettings.named(edit),
        out=job.edit.get("out"),
        format=edit["format"],
        fps=edit["fps"],
        batch_size=edit["batch_size"],
        control=control_spec(
            job.edit.get("control"), job.edit.get("control_model"), job.edit.get("control_video"), edit["control_scale"]
        ),
        tune_key=tune_key,
        invert_steps=job.invert.get("steps"),
        invert_prompt=job.invert.get("prompt", INVERT["prompt"].default),
        frames=_frames(job),
        inversion=InversionSettings.named(job.invert),
        attention=AttentionSettings.named(job.edit),
        loras=tuple((Path(path), scale) for path, scale in map(split_lora, job.edit.get("lora", ()))),
    )


def _frames(job: Job) -> FrameChoice:
    """The frames the job inverts and edits (each field None: the tuned selection's)."""
    return FrameChoice.named(job.edit)


def _invert_only(job: Job) -> dict[str, Any]:
    """A job without edits: its inversion as `tav invert` makes it, by name (`--inversion` null-text also fits)."""
    invert = job.invert
    return {
        "inversion": InversionSettings.named(invert),
        "steps": invert.get("steps", job.edit.get("steps", INVERT["steps"].default)),
        "prompt": invert.get("prompt", INVERT["prompt"].default),
        "settings": EditSettings.named(job.edit),
    }


def _job_artifacts(session: Session, job: Job, stage: list[str]) -> Iterator[Artifact]:
    """The job's artifacts as its tune, inversion and edits finish; `stage[0]` names the step under way."""
    force = bool(job.tune.get("force", False))
    scorer = None
    if job.tune.get("eval"):
        import torch

        from tavcli.method.metrics import ClipScorer

        # On the CPU, as `tav tune --eval` loads it: the tune moves it to the device only while it scores.
        scorer = ClipScorer(job.tune.get("clip_model", DEFAULT_CLIP_MODEL), torch.device("cpu"))
    tuning = _tune_request(job, session)
    tuned = workflow.tune(session, tuning, force=force, preview=_preview(job), scorer=scorer)
    yield from tuned
    if not job.edits and not job.invert:
        return
    stage[0] = "invert"
    project = session.project(job.project)
    tune = project.find("tunes", next(artifact for artifact in reversed(tuned) if artifact.kind == "tune").key)
    if job.edit.get("tune_step"):  # the state kept at that step of the job's tune
        tune = workflow.kept_tune(project, tune, job.edit["tune_step"])
    if not job.edits:  # inverted (and fitted) ahead, as `tav invert --inversion` does
        yield from workflow.invert_for_edits(
            session, job.project, force=force, tune_key=tune.key, frames=_frames(job), **_invert_only(job)
        )
        return
    stage[0] = "edit"
    request = _edit_request(job, tune.key)  # checked before its inversion is computed
    stage[0] = "invert"
    plan = workflow.plan_edit(session, request, force_inversion=force)  # `force` recomputes every step
    if plan.inverted is not None:
        yield plan.inverted
    stage[0] = "edit"
    yield from workflow.run_plan(session, plan, request, force=force)


def plan_jobs(session: Session, jobs: list[Job], keep_going: bool, emit: Emit) -> bool:
    """Emit what running `jobs` would reuse and what it would compute (a row per entry), computing nothing.

    A job that cannot be planned gets the failure record its run would get; returns whether every job was
    planned. Without `keep_going` the first failure stops the rest, as it stops a run.
    """
    ok = True
    for job in jobs:
        stage = ["tune"]
        try:
            for kind, step in _job_plan(session, job, stage):
                emit(_row(job, kind, step))
        except Exception as error:
            if interruption(error) is not None:
                raise
            emit(_failed(job, stage[0], error, 0.0))
            ok = False
            if not keep_going:
                return False
    return ok


def _job_plan(session: Session, job: Job, stage: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, entry) of each entry the job's run would reuse or compute, in the run's order, as the workflow
    plans them."""
    force, runtime = bool(job.tune.get("force", False)), session.runtime
    tune_request = _tune_request(job, session)
    plan = workflow.tune_plan(session, tune_request, force=force, memory=False)
    yield from (("latents", plan["latents"]), ("tune", plan["tune"]))
    tune = workflow.tune_entry(session, tune_request)
    stage[0] = "edit"
    request = _edit_request(job, tune.key) if job.edits else None  # checked as the run checks it, keys known or not
    if not (job.edits or job.invert) or _other_frames(job):
        return
    stage[0] = "invert"
    project = session.project(job.project)
    if request is None:  # `tav invert --inversion`: the inversion, and a null-text fit made ahead
        inversion, fit = workflow.invert_needs(project, tune, runtime=runtime, **_invert_only(job))
        yield "inversion", _planned(inversion, force)
        yield from [] if fit is None else [("null-text", _planned(fit, force))]
        return
    needed = workflow.inversion_needed(project, tune, request)
    inversion = workflow.inversion_entry(project, tune.key, needed.steps, needed.prompt, runtime)
    yield "inversion", _planned(inversion, force)
    stage[0] = "edit"
    for kind, entry, prompt in workflow.edit_needs(project, inversion.key, request, runtime).entries():
        planned = _planned(entry, force and kind == "edit")  # a fit is never forced: only the edits are
        yield kind, planned if prompt is None else {**planned, "prompt": prompt}


def _row(job: Job, kind: str, step: dict[str, Any]) -> dict[str, Any]:
    """A plan's record: the entry, whether it is reused, and (to compute) its prompt or the step it resumes from."""
    extra = {k: v for k, v in step.items() if k in ("prompt", "resume_from") and not step["cached"]}
    row = {"job": job.name, "kind": kind, "key": step["key"], "path": step["path"], "cached": step["cached"]}
    return {**row, "action": "reuse" if step["cached"] else "compute", **extra}


def _other_frames(job: Job) -> bool:
    """Whether the job edits other frames or a kept state: their keys are only known once they are read."""
    return any(job.edit.get(name) is not None for name in ("frames", "stride", "start", "window", "tune_step"))


def _planned(entry: Any, force: bool) -> dict[str, Any]:
    return {"key": entry.key, "path": str(entry.path), "cached": entry.complete and not force}
