"""Running batch jobs: this process's share of them, in model order, each as `tav tune/invert/edit` runs it.

Jobs become the same requests the command line makes (`tavcli.settings.requests`) and go through the same
workflow; `plan_jobs` computes the same keys without computing anything. Torch is imported only
when work starts.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tavcli import workflow
from tavcli.batch.jobs import Job, JobProblem
from tavcli.errors import TavError, first_line, interruption
from tavcli.models.names import split_lora
from tavcli.progress import Reporter
from tavcli.settings.config import DEFAULT_CLIP_MODEL
from tavcli.settings.options import EDIT, INVERT, TUNE
from tavcli.settings.requests import (
    AttentionSettings,
    EditRequest,
    EditSettings,
    FrameChoice,
    FrameSelection,
    InversionSettings,
    Names,
    Preview,
    TuneRequest,
    TuneSettings,
    control_spec,
    frame_size,
    preview_choice,
)

__all__ = ["Emit", "failure_record", "plan_jobs", "run_jobs"]


Emit = Callable[[dict[str, Any]], None]


def run_jobs(session: Any, jobs: list[Job], keep_going: bool, emit: Emit) -> bool:
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


def _tune_request(job: Job, reporter: Reporter) -> TuneRequest:
    """The job's tune as `tav tune` would make it from the same options."""
    options = {name: job.tune.get(name, option.default) for name, option in TUNE.items()}
    return TuneRequest(
        clip=job.clip,
        prompt=job.prompt,
        project=job.project,
        model=job.model,
        selection=FrameSelection(frames=options["frames"], stride=options["stride"], start=options["start"]),
        size=frame_size(options["width"], options["height"], options["resize"], reporter),
        settings=TuneSettings(
            steps=options["steps"],
            learning_rate=options["lr"],
            seed=options["seed"],
            gradient_checkpointing=job.tune.get("gradient_checkpointing", False),
            checkpoint_every=options["checkpoint_every"],
            save_precision=options["save_precision"],
            rank=options["rank"],
        ),
        frame_norm=options["frame_norm"],
    )


def _preview(job: Job) -> Preview | None:
    """The job's previews while tuning, as `tav tune --preview` asks for them (checked so at validation)."""
    preview = job.tune.get("preview"), job.tune.get("preview_every"), job.tune.get("preview_steps")
    return preview_choice(*preview, evaluate=job.tune.get("eval", False), names=Names(""))


def _edit_request(job: Job, tune_key: str) -> EditRequest:
    """The job's edits as `tav edit` would make them, of the job's tune and its inversion."""
    edit = {name: job.edit.get(name, option.default) for name, option in EDIT.items()}
    invert_steps, invert_prompt = _inversion(job)
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
        invert_steps=invert_steps,
        invert_prompt=invert_prompt,
        frames=_frames(job),
        inversion=InversionSettings.named(job.invert),
        attention=AttentionSettings.named(job.edit),
        loras=tuple((Path(path), scale) for path, scale in map(split_lora, job.edit.get("lora", ()))),
    )


def _frames(job: Job) -> FrameChoice:
    """The frames the job inverts and edits (each field None: the tuned selection's)."""
    return FrameChoice(**{name: job.edit.get(name) for name in ("frames", "stride", "start", "window")})


def _inversion(job: Job) -> tuple[int, str]:
    """The job's inversion steps (default: its sampling steps) and prompt (the job's own for null-text and
    negative-prompt inversions, as `tav edit --inversion` inverts, and for attention control unless the job names
    one: its maps are the source prompt's)."""
    steps = job.invert.get("steps", job.edit.get("steps", EDIT["steps"].default))
    if InversionSettings.named(job.invert).reconstructs:
        return steps, job.prompt
    if job.edits and AttentionSettings.named(job.edit).active:  # its maps are the source prompt's
        return steps, job.invert.get("prompt") or job.prompt
    return steps, job.invert.get("prompt", INVERT["prompt"].default)


def _job_artifacts(session: Any, job: Job, stage: list[str]) -> Any:
    """The job's artifacts as its tune, inversion and edits finish; `stage[0]` names the step under way."""
    force = bool(job.tune.get("force", False))
    scorer = None
    if job.tune.get("eval"):
        import torch

        from tavcli.method.metrics import ClipScorer

        # On the CPU, as `tav tune --eval` loads it: the tune moves it to the device only while it scores.
        scorer = ClipScorer(job.tune.get("clip_model", DEFAULT_CLIP_MODEL), torch.device("cpu"))
    tuned = workflow.tune(session, _tune_request(job, session.reporter), force, _preview(job), scorer)
    yield from tuned
    if not job.edits and not job.invert:
        return
    stage[0] = "invert"
    tune_key = next(artifact for artifact in reversed(tuned) if artifact.kind == "tune").key
    if job.edit.get("tune_step"):  # the state kept at that step of the job's tune
        project = session.project(job.project)
        tune_key = workflow.kept_tune(project, project.find("tunes", tune_key), job.edit["tune_step"]).key
    inverted = workflow.invert(session, job.project, *_inversion(job), force, tune_key=tune_key, frames=_frames(job))
    yield inverted
    choice = InversionSettings.named(job.invert)
    if choice.inversion == "null-text" and not job.edits:  # fitted ahead, as `tav invert --inversion` does
        project = session.project(job.project)
        inversion, tuned = project.find("inversions", inverted.key), project.find("tunes", tune_key)
        sampling = EditSettings.named(job.edit)
        yield workflow.fit_null_text(session, project, tuned, inversion, sampling, choice, force)
    if job.edits:
        stage[0] = "edit"
        yield from workflow.edit(session, _edit_request(job, tune_key), force)


def plan_jobs(session: Any, jobs: list[Job], keep_going: bool, emit: Emit) -> bool:
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


def _job_plan(session: Any, job: Job, stage: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, entry) of each entry the job's run would reuse or compute, in the run's order."""
    force, runtime = bool(job.tune.get("force", False)), session.runtime
    plan = workflow.tune_plan(session, _tune_request(job, session.reporter), force, memory=False)
    yield from (("latents", plan["latents"]), ("tune", plan["tune"]))
    tune_key = plan["tune"]["key"]
    stage[0] = "edit"
    request = _edit_request(job, tune_key) if job.edits else None  # checked as the run checks it, keys known or not
    if not (job.edits or job.invert) or _other_frames(job):
        return
    stage[0] = "invert"
    project, choice = session.project(job.project), InversionSettings.named(job.invert)
    inversion = workflow.inversion_entry(project, tune_key, *_inversion(job), runtime)
    yield "inversion", _planned(inversion, force)
    fit = None
    if choice.inversion == "null-text":
        sampling = EditSettings.named(job.edit) if request is None else request.settings
        fit = workflow.null_text_entry(project, inversion.key, sampling, choice, runtime)
    if request is None:
        if fit is not None:  # fitted ahead, as `tav invert --inversion null-text` does
            yield "null-text", _planned(fit, force)
        return
    stage[0] = "edit"
    control = None if request.control is None else workflow.control_key(request.control)
    entries = workflow.edit_entries(project, inversion.key, request, runtime, control, None if fit is None else fit.key)
    if fit is not None and (fit.complete or not all(entry.complete for entry in entries.values())):
        yield "null-text", _planned(fit, False)  # fitted (never forced) only when an edit is sampled
    yield from (("edit", {**_planned(entry, force), "prompt": text}) for text, entry in entries.items())


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
