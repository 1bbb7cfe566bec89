"""Batch files' jobs (TOML or JSON Lines): every job validated, its paths resolved, before any work.

    [defaults]                 # optional (TOML only): merged under every job
    model = "tiny"

    [[job]]
    name = "ski"               # optional; default job-N
    clip = "skiing.mp4"        # relative to the batch file
    prompt = "a man is skiing"
    edits = ["a panda is skiing"]
    steps = 300
    edit = { steps = 20, guidance = 7.5 }

The files are read by `tavcli.batch.reading`; the fields and their ranges are `tavcli.batch.schema`'s. This
module imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tavcli.batch.reading import read_jobs, read_jsonl, read_toml
from tavcli.batch.schema import validate_job
from tavcli.errors import TavError
from tavcli.models.names import lora_path, model_name
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.config import DEFAULT_MODEL, default_project
from tavcli.settings.declared import Names
from tavcli.settings.editing import FrameChoice
from tavcli.settings.inputs import require_folder
from tavcli.settings.option import OptionError
from tavcli.settings.options import check_rate
from tavcli.settings.sampling import EditSettings, InversionSettings, control_spec
from tavcli.settings.tuning import FrameSelection, preview_choice

__all__ = ["BatchContext", "Job", "JobProblem", "check_frames", "parse_jobs", "read_jobs"]

NOT_TUNE = ("name", "clip", "prompt", "edits", "invert", "edit")  # a job's fields that are no tune option


def _path(value: str, base: Path) -> Path:
    """A path as the user wrote it: absolute, or relative to the batch file's folder (the current one for stdin)."""
    return Path(os.path.abspath(base / Path(value).expanduser()))  # `..` folded, links kept


def _model_name(value: str, base: Path) -> str:
    """A hub id, `tiny`, or a local folder (relative to the batch file)."""
    local = _path(value, base)
    return str(local) if local.exists() else value


def _loras(value: list[str], base: Path, names: Names) -> tuple[str, ...]:
    """LoRA files as PATH or PATH:SCALE, relative to the batch file, each there (as `tav edit` checks them)."""
    return tuple(f"{path}:{scale}" for path, scale in (lora_path(given, names("lora"), base) for given in value))


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
    model: str  # the model's name, as `tav tune` builds it from the job's model options
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


def parse_jobs(
    text: str,
    source: str,
    base: Path,
    jsonl: bool,
    context: BatchContext | None = None,
    check: Callable[[Job], None] | None = None,
) -> tuple[list[Job], list[JobProblem]]:
    """Parse and validate every job; syntax errors raise, per-job problems are returned in file order.

    Paths are the user's choice, absolute or relative to `base`; with `context.root` every path a
    job writes to (its project, its `edit.out`) must lie inside that folder. `check` looks further
    at each job whose fields are valid (`check_frames` reads its clip).
    """
    context = context or BatchContext()
    raw = read_jsonl(text, source) if jsonl else read_toml(text, source)
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
            if check is not None:
                check(job)
            jobs.append(job)
        except (ValueError, TavError) as error:
            problems.append(JobProblem(name, where, str(error)))
    if not raw:
        raise TavError(f"{source} has no jobs", "add [[job]] tables (TOML) or one JSON object per line")
    return jobs, problems


def _job(name: str, where: str, data: dict[str, Any], base: Path, context: BatchContext) -> Job:
    """A job from its fields: checked by the schema, then its paths resolved and its writes confined."""
    fields = validate_job(data)
    clip = _path(fields["clip"], base)
    tune = {key: value for key, value in fields.items() if key not in NOT_TUNE}
    for key in ("model", "model_config"):
        if key in tune:
            tune[key] = _model_name(tune[key], base)
    if "lora" in tune:
        tune["lora"] = _loras(tune["lora"], base, Names(""))
    if "vae" in tune:
        tune["vae"] = str(_path(tune["vae"], base))
    edit = dict(fields.get("edit", {}))
    for key in ("out", "control_video"):
        if key in edit:
            edit[key] = _path(edit[key], base)
    if "lora" in edit:
        edit["lora"] = _loras(edit["lora"], base, Names("edit"))
    if "control_model" in edit:
        edit["control_model"] = _model_name(edit["control_model"], base)
    project = Path(
        os.path.abspath(_path(tune.pop("project"), base) if "project" in tune else context.project_for(clip))
    )
    _confine("project", project, context.root)
    _confine("edit.out", edit.get("out"), context.root)
    require_folder(project, Names("")("project"))  # as `tav tune` checks --project, before any work
    if "out" in edit:
        require_folder(edit["out"], Names("edit")("out"))
    check_rate(edit.get("format", "mp4"), edit.get("fps"))
    preview = tune.get("preview"), tune.get("preview_every"), tune.get("preview_steps")
    preview_choice(*preview, evaluate=tune.get("eval", False), names=Names(""))  # the rule `tav tune` follows
    control = control_spec(
        edit.get("control"), edit.get("control_model"), edit.get("control_video"), edit.get("control_scale", 1.0)
    )
    inversion = InversionSettings.named(fields.get("invert", {}))
    sampling = EditSettings.named(edit)  # the rules `tav edit` follows
    invert = fields.get("invert", {})
    steps, loras = invert.get("steps", sampling.steps), bool(edit.get("lora"))
    inversion.check(sampling, control, Names("edit"), steps, loras, own=Names("invert"))
    if inversion.reconstructs and invert.get("prompt", fields["prompt"]) != fields["prompt"]:
        raise OptionError(
            f"field 'invert.inversion' = {inversion.inversion} inverts with the job's prompt: leave out 'invert.prompt'"
        )
    edits = tuple(fields.get("edits", ()))
    attention = AttentionSettings.named(edit)
    attention.check(sampling, inversion, list(edits), Names("edit"), steps, inversion_names=Names("invert"))
    if attention.active:
        attention.check_source(invert.get("prompt") or fields["prompt"], Names("edit"))
    model = _job_model(tune, context)
    return Job(name, where, clip, fields["prompt"], edits, project, model, tune, fields.get("invert", {}), edit)


def check_frames(job: Job) -> None:
    """Refuse a job whose clip is no video long enough for its tune's frames and its edit's (`tav tune` probes
    its clip so before loading anything); reads the clip's header (and decodes it if that has no count)."""
    from tavcli.media.video import frame_count, probe

    tuned = FrameSelection.named(job.tune)
    probe(job.clip, tuned if "frames" in job.tune else None)  # else the model's own count, checked when it runs
    chosen = {name: job.edit[name] for name in ("frames", "stride", "start") if name in job.edit}
    if not chosen:
        return  # the tuned frames: just checked
    count = frame_count(job.clip)
    names = Names("edit")
    selection = FrameChoice(
        frames=chosen.get("frames"), stride=chosen.get("stride"), start=chosen.get("start")
    ).selection(tuned, lambda: count, names)
    if selection.last_index >= count:
        given = [names.given(name, value) for name, value in chosen.items()]
        fields = given[0] if len(given) == 1 else "fields " + ", ".join(g.removeprefix("field ") for g in given)
        raise OptionError(
            f"{fields}: the edited frames ({selection.frames} at stride {selection.stride} from frame "
            f"{selection.start}) need {selection.last_index + 1}, and {job.clip} has {count}",
            "lower edit.start, edit.frames or edit.stride",
        )


def _job_model(tune: dict[str, Any], context: BatchContext) -> str:
    """The job's model name, with its model config, LoRAs, revision, variant and VAE (as `tav tune` builds it)."""
    base, loras = str(tune.get("model", context.model)), list(tune.get("lora", ()))
    config, revision, variant = tune.get("model_config"), tune.get("revision"), tune.get("variant")
    return model_name(base, config, loras, context.model_config, revision, variant, tune.get("vae"))


def _confine(field: str, path: Path | None, root: Path | None) -> None:
    """With --root, a path a job writes to must lie inside it (links resolved)."""
    if root is not None and path is not None and not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"field {field!r} writes to {path}, outside --root {root}")
