"""`tav batch`: many tune/invert/edit jobs from a TOML or JSON Lines file, validated before any work.

A job is one clip, its prompt, its edit prompts, and any option of `tav tune` (top level),
`tav invert` (an `invert` table) or `tav edit` (an `edit` table):

    [defaults]                 # optional (TOML only): merged under every job
    model = "tiny"

    [[job]]
    name = "ski"               # optional; default job-N
    clip = "skiing.mp4"        # relative to the batch file
    prompt = "a man is skiing"
    edits = ["a panda is skiing"]
    steps = 300
    edit = { steps = 20, guidance = 7.5 }

This module imports no torch: parsing and validating stay fast and testable on their own.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tavcli.config import DEFAULT_MODEL, closest, default_project
from tavcli.errors import TavError
from tavcli.inputs import require_regular_file
from tavcli.model_name import model_name, split_lora
from tavcli.options import EDIT, INVERT, TUNE, Option, check_rate
from tavcli.progress import Reporter
from tavcli.requests import EditRequest, EditSettings, TuneRequest, TuneSettings, control_spec, frame_size
from tavcli.video import FrameSelection

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "BatchContext",
    "Job",
    "JobProblem",
    "assign",
    "failure_record",
    "parse_jobs",
    "plan_jobs",
    "read_jobs",
    "run_jobs",
]

Check = Callable[[Any, Path], Any]


def _declared(option: Option) -> Check:
    """A field checked like its command-line option (`tavcli.options`)."""
    return lambda value, base: option.check(value)


def _text(value: Any, base: Path) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _prompt(value: Any, base: Path) -> str:
    if not _text(value, base).strip():
        raise ValueError("must not be empty")
    return str(value)


def _flag(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _path(value: Any, base: Path) -> Path:
    """A path as the user wrote it: absolute, or relative to the batch file's folder (the current one for stdin)."""
    return Path(os.path.abspath(base / Path(_text(value, base)).expanduser()))  # `..` folded, links kept


def _model_name(value: Any, base: Path) -> str:
    """A hub id, `tiny`, or a local folder (relative to the batch file)."""
    text = _text(value, base)
    local = _path(text, base)
    return str(local) if local.exists() else text


def _loras(value: Any, base: Path) -> tuple[str, ...]:
    """LoRA files as PATH or PATH:SCALE, relative to the batch file."""
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list like ["style.safetensors:0.8"]')
    return tuple(f"{_path(path, base)}:{scale}" for path, scale in map(split_lora, value))


def _prompts(value: Any, base: Path) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError('must be a list of prompts, e.g. ["a panda is skiing"]')
    return tuple(_prompt(item, base) for item in value)


TUNE_FIELDS: dict[str, Check] = {
    "model": _model_name,
    "model_config": _model_name,
    "lora": _loras,
    "project": _path,
    **{name: _declared(option) for name, option in TUNE.items()},
    "gradient_checkpointing": _flag,
    "force": _flag,
}
INVERT_FIELDS: dict[str, Check] = {name: _declared(option) for name, option in INVERT.items()}
EDIT_FIELDS: dict[str, Check] = {
    **{name: _declared(option) for name, option in EDIT.items()},
    "out": _path,
    "control": _text,
    "control_model": _model_name,
    "control_video": _path,
}
JOB_FIELDS = ("name", "clip", "prompt", "edits", "invert", "edit", *TUNE_FIELDS)


@dataclass(frozen=True)
class BatchContext:
    """What every job inherits from the command line and configuration."""

    model: str = DEFAULT_MODEL  # for jobs that name none
    project_for: Callable[[Path], Path] = default_project  # default project of a clip
    model_config: str | None = None  # for jobs whose model is a single file and that name no model_config
    root: Path | None = None  # --root: every write of the batch stays inside it


@dataclass(frozen=True)
class Job:
    """One validated job: a clip, its prompt, edit prompts, its project, and the options given for each command."""

    name: str
    where: str  # "job 2" or "line 3": how errors point at it
    clip: Path
    prompt: str
    edits: tuple[str, ...]
    project: Path  # absolute: the job's `project`, else the clip's default project
    tune: dict[str, Any]
    invert: dict[str, Any]
    edit: dict[str, Any]

    @property
    def tune_group(self) -> str:
        """Jobs with equal groups share one tune: they run in the same process, one after another."""
        return json.dumps([str(self.clip), self.prompt, {k: str(v) for k, v in self.tune.items()}], sort_keys=True)


@dataclass(frozen=True)
class JobProblem:
    """A job that cannot run, and why (named by job and field)."""

    name: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where} ({self.name}): {self.message}"


def read_jobs(given: str) -> tuple[str, str, Path, bool]:
    """(text, source name, folder relative paths start from, is JSON Lines) of `FILE` or `-` (stdin)."""
    if given == "-":
        return sys.stdin.read(), "stdin", Path.cwd(), True
    path = Path(given)
    if not path.exists() and not path.is_symlink():
        raise TavError(f"no batch file {path}", "give a .toml or .jsonl file, or - to read JSON Lines from stdin")
    require_regular_file(
        path, "batch file", "give a .toml or .jsonl file; to read a pipe, use - (cat jobs.jsonl | tav batch -)"
    )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TavError(f"{path} is not UTF-8 text: {error.reason}") from None
    return text, str(path), path.parent.resolve(), path.suffix.lower() in (".jsonl", ".ndjson", ".json")


def parse_jobs(
    text: str, source: str, base: Path, jsonl: bool, context: BatchContext | None = None
) -> tuple[list[Job], list[JobProblem]]:
    """Parse and validate every job; syntax errors raise, per-job problems are returned.

    Paths are the user's choice, absolute or relative to `base`; with `context.root` every path a
    job writes to (its project, its `edit.out`) must lie inside that folder.
    """
    context = context or BatchContext()
    raw = _read_jsonl(text, source) if jsonl else _read_toml(text, source)
    jobs: list[Job] = []
    problems: list[JobProblem] = []
    seen: set[str] = set()
    for index, (where, data) in enumerate(raw, start=1):
        given = data.get("name")
        name = given if isinstance(given, str) and given else f"job-{index}"
        try:
            job = _job(name, where, data, base.absolute(), context)
            if job.name in seen:
                raise ValueError(f"the name {job.name!r} is used by an earlier job; names must be unique")
            seen.add(job.name)
            jobs.append(job)
        except (ValueError, TavError) as error:
            problems.append(JobProblem(name, where, str(error)))
    if not raw:
        raise TavError(f"{source} has no jobs", "add [[job]] tables (TOML) or one JSON object per line")
    return jobs, problems


def _read_toml(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TavError(f"{source}: {error}", "fix the TOML syntax") from None
    unknown = set(data) - {"job", "defaults"}
    if unknown:
        key = sorted(unknown)[0]
        raise TavError(f"{source}: unknown table {key!r}{closest(key, ['job', 'defaults'])}", "use [[job]] tables")
    jobs, defaults = data.get("job", []), data.get("defaults", {})
    if not isinstance(jobs, list) or not isinstance(defaults, dict):
        raise TavError(f"{source}: write jobs as [[job]] tables and defaults as one [defaults] table")
    merged = []
    for number, job in enumerate(jobs, start=1):
        if not isinstance(job, dict):
            raise TavError(f"{source}: job {number} must be a [[job]] table, not {type(job).__name__}")
        tables = {
            key: {**defaults[key], **job.get(key, {})}
            for key in ("invert", "edit")
            if isinstance(defaults.get(key), dict) and isinstance(job.get(key, {}), dict)
        }
        merged.append((f"{source} job {number}", {**defaults, **job, **tables}))
    return merged


def _read_jsonl(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise TavError(
                f"{source} line {number}, column {error.colno}: {error.msg}", "one JSON object per line"
            ) from None
        if not isinstance(data, dict):
            raise TavError(f"{source} line {number}: a job must be a JSON object, not {type(data).__name__}")
        jobs.append((f"{source} line {number}", data))
    return jobs


def _job(name: str, where: str, data: dict[str, Any], base: Path, context: BatchContext) -> Job:
    for key in data:
        if key.replace("-", "_") not in JOB_FIELDS:
            raise ValueError(f"unknown field {key!r}{closest(key.replace('-', '_'), JOB_FIELDS)}")
    for required in ("clip", "prompt"):
        if required not in data:
            raise ValueError(f"field {required!r} is missing")
    clip = _field("clip", data["clip"], _path, base)
    prompt = _field("prompt", data["prompt"], _prompt, base)
    edits = _field("edits", data.get("edits", []), _prompts, base)
    tune = _options("", {k: v for k, v in data.items() if k not in JOB_FIELDS[:6]}, TUNE_FIELDS, base)
    invert = _options("invert.", data.get("invert", {}), INVERT_FIELDS, base)
    edit = _options("edit.", data.get("edit", {}), EDIT_FIELDS, base)
    project = Path(os.path.abspath(tune.pop("project", None) or context.project_for(clip)))
    _confine("project", project, context.root)
    _confine("edit.out", edit.get("out"), context.root)
    check_rate(edit.get("format", "mp4"), edit.get("fps"))
    control_spec(
        edit.get("control"), edit.get("control_model"), edit.get("control_video"), edit.get("control_scale", 1.0)
    )
    return Job(_field("name", name, _text, base), where, clip, prompt, edits, project, tune, invert, edit)


def _confine(field: str, path: Path | None, root: Path | None) -> None:
    """With --root, a path a job writes to must lie inside it (links resolved)."""
    if root is not None and path is not None and not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"field {field!r} writes to {path}, outside --root {root}")


def _options(prefix: str, data: Any, fields: dict[str, Check], base: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"field {prefix.rstrip('.')!r} must be a table of options")
    options = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown field {prefix + key!r}{closest(name, list(fields))}")
        options[name] = _field(prefix + key, value, fields[name], base)
    return options


def _field(name: str, value: Any, check: Check, base: Path) -> Any:
    try:
        return check(value, base)
    except ValueError as error:
        raise ValueError(f"field {name!r} {error}, not {json.dumps(value)}") from None


def assign(jobs: list[Job], process: int, processes: int) -> list[Job]:
    """This process's share of the jobs: whole tune groups, balanced by edit count, the same on every process."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.tune_group, []).append(job)
    loads = [0] * processes
    owner: dict[str, int] = {}
    for group, members in sorted(groups.items(), key=lambda item: -sum(1 + len(j.edits) for j in item[1])):
        owner[group] = loads.index(min(loads))
        loads[owner[group]] += sum(1 + len(job.edits) for job in members)
    return [job for job in jobs if owner[job.tune_group] == process]


Emit = Callable[[dict[str, Any]], None]


def run_jobs(session: Any, jobs: list[Job], context: BatchContext, keep_going: bool, emit: Emit) -> bool:
    """Run `jobs` in order, one base-model load per model; emit a record per artifact or failed job.

    Returns whether every job succeeded. Without `keep_going` the first failure stops the rest.
    """
    import time

    ordered = sorted(jobs, key=lambda job: _model(job, context))  # stable: same-model jobs stay in file order
    ok = True
    for index, job in enumerate(ordered):
        started = time.perf_counter()
        stage = ["tune"]  # the step under way, named in a failure record
        try:
            for artifact in _job_artifacts(session, job, context, stage):
                emit({"job": job.name, **artifact.record(), "error": None})
        except (TavError, OSError) as error:
            if getattr(error, "exit_code", 1) == 130:
                raise  # interrupted: stop everything, the tune is saved
            message = error.message if isinstance(error, TavError) else str(error)
            emit(_failure(job.name, stage[0], message, time.perf_counter() - started))
            ok = False
            if not keep_going:
                return False
        following = ordered[index + 1] if index + 1 < len(ordered) else None
        if following is None or _model(following, context) != _model(job, context):
            session.release(_model(job, context))  # no later job needs it: free the memory
    return ok


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


def _model(job: Job, context: BatchContext) -> str:
    """The job's model name, with its model config and LoRAs (as `tav tune` builds it)."""
    base = str(job.tune.get("model", context.model))
    return model_name(base, job.tune.get("model_config"), list(job.tune.get("lora", ())), context.model_config)


def _tune_request(job: Job, context: BatchContext, reporter: Reporter) -> TuneRequest:
    """The job's tune as `tav tune` would make it from the same options."""
    options = {name: job.tune.get(name, option.default) for name, option in TUNE.items()}
    return TuneRequest(
        job.clip,
        job.prompt,
        job.project,
        _model(job, context),
        FrameSelection(options["frames"], options["stride"], options["start"]),
        frame_size(options["width"], options["height"], options["resize"], reporter),
        TuneSettings(
            options["steps"],
            options["lr"],
            options["seed"],
            job.tune.get("gradient_checkpointing", False),
            options["checkpoint_every"],
        ),
        options["frame_norm"],
    )


def _edit_request(job: Job, tune_key: str) -> EditRequest:
    """The job's edits as `tav edit` would make them, of the job's tune and its inversion."""
    edit = {name: job.edit.get(name, option.default) for name, option in EDIT.items()}
    settings = EditSettings(edit["steps"], edit["guidance"], edit["negative"], edit["seed"], edit["eta"])
    return EditRequest(
        job.project,
        list(job.edits),
        settings,
        job.edit.get("out"),
        edit["format"],
        edit["fps"],
        edit["batch_size"],
        control_spec(
            job.edit.get("control"), job.edit.get("control_model"), job.edit.get("control_video"), edit["control_scale"]
        ),
        tune_key,
        *_inversion(job),
    )


def _inversion(job: Job) -> tuple[int, str]:
    """The job's inversion steps (default: its sampling steps) and prompt."""
    steps = job.invert.get("steps", job.edit.get("steps", EDIT["steps"].default))
    return steps, job.invert.get("prompt", INVERT["prompt"].default)


def _job_artifacts(session: Any, job: Job, context: BatchContext, stage: list[str]) -> Any:
    """The job's artifacts as its tune, inversion and edits finish; `stage[0]` names the step under way."""
    from tavcli import workflow

    force = bool(job.tune.get("force", False))
    tuned = workflow.tune(session, _tune_request(job, context, session.reporter), force)
    yield from tuned
    if not job.edits and not job.invert:
        return
    stage[0] = "invert"
    yield workflow.invert(session, job.project, *_inversion(job), force, tune_key=tuned[-1].key)
    if job.edits:
        stage[0] = "edit"
        yield from workflow.edit(session, _edit_request(job, tuned[-1].key), force)


def plan_jobs(session: Any, jobs: list[Job], context: BatchContext) -> list[dict[str, Any]]:
    """What running `jobs` would reuse and what it would compute, without computing anything."""
    from tavcli import workflow

    rows = []
    for job in jobs:
        force = bool(job.tune.get("force", False))
        plan = workflow.tune_plan(session, _tune_request(job, context, session.reporter), force, memory=False)
        steps = [("latents", plan["latents"]), ("tune", plan["tune"])]
        if job.edits or job.invert:
            project = session.project(job.project)
            inversion = workflow.inversion_entry(project, plan["tune"]["key"], *_inversion(job), session.runtime)
            steps.append(("inversion", _planned(inversion, force)))
        if job.edits:
            request = _edit_request(job, plan["tune"]["key"])
            control = None if request.control is None else workflow.control_key(request.control)
            entries = workflow.edit_entries(project, inversion.key, request, session.runtime, control)
            steps += [("edit", {**_planned(entry, force), "prompt": text}) for text, entry in entries.items()]
        for kind, step in steps:
            extra = {k: v for k, v in step.items() if k in ("prompt", "resume_from") and not step["cached"]}
            row = {"job": job.name, "kind": kind, "key": step["key"], "path": step["path"], "cached": step["cached"]}
            rows.append({**row, "action": "reuse" if step["cached"] else "compute", **extra})
    return rows


def _planned(entry: Any, force: bool) -> dict[str, Any]:
    return {"key": entry.key, "path": str(entry.path), "cached": entry.complete and not force}
