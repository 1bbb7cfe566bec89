"""The batch job format as data: pydantic models built from the option declarations (`tavcli.settings.options`),
their JSON Schema (`tav batch --schema`), and validation errors worded the way tav words them.

A job is one clip, its prompt, its edit prompts, and any option of `tav tune` (top level),
`tav invert` (an `invert` table) or `tav edit` (an `edit` table). Every field is strict: a number
is never read from a string, a bool never counts as a number, NaN and inf are refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, create_model

from tavcli.settings.config import closest
from tavcli.settings.option import Option
from tavcli.settings.options import EDIT, INVERT, TUNE

__all__ = ["JOB_FIELDS", "job_file_schema", "validate_job"]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("blank")
    return text


Prompt = Annotated[StrictStr, AfterValidator(_not_blank)]
# Fields that are no command-line number or choice: (type, what a valid value is, in words).
OTHER_FIELDS: dict[str, tuple[Any, str, str]] = {
    "name": (StrictStr, "a string", "names the job in records and errors"),
    "clip": (StrictStr, "a string", "the clip, relative to the batch file (required)"),
    "prompt": (Prompt, "a string that is not empty", "what the clip shows (required)"),
    "edits": (list[Prompt], 'a list of prompts, e.g. ["a panda is skiing"]', "prompts to render, one clip each"),
    "model": (StrictStr, "a string", "as tav tune --model; a local folder is relative to the batch file"),
    "model_config": (StrictStr, "a string", "as tav tune --model-config"),
    "revision": (StrictStr, "a string", "as tav tune --revision"),
    "variant": (StrictStr, "a string", "as tav tune --variant"),
    "vae": (StrictStr, "a string", "as tav tune --vae, relative to the batch file"),
    "lora": (
        list[StrictStr],
        'a list like ["style.safetensors:0.8"]',
        "as tav tune --lora (top level) or tav edit --lora (edit table), relative to the file",
    ),
    "eval": (StrictBool, "true or false", "as tav tune --eval: score each preview with CLIP"),
    "clip_model": (StrictStr, "a string", "as tav tune --clip-model"),
    "project": (StrictStr, "a string", "the project directory (default: beside the clip)"),
    "force": (StrictBool, "true or false", "recompute every step of the job"),
    "out": (StrictStr, "a string", "as tav edit --out"),
    "control": (StrictStr, "a string", "as tav edit --control"),
    "control_model": (StrictStr, "a string", "as tav edit --control-model"),
    "control_video": (StrictStr, "a string", "as tav edit --control-video, relative to the batch file"),
}
TUNE_ONLY = (
    "model",
    "model_config",
    "revision",
    "variant",
    "vae",
    "lora",
    "project",
    "force",
    "eval",
    "clip_model",
)
EDIT_ONLY = ("out", "control", "control_model", "control_video", "lora")


def _declared(option: Option) -> tuple[Any, Any]:
    """A model field from an option's declaration: its type, range and help."""
    annotation: Any = {int: int, float: float, str: StrictStr, bool: StrictBool}[option.kind]
    if option.allowed:
        annotation = Literal[option.allowed]
    bounds: dict[str, Any] = {} if option.allowed else {"strict": True}  # a choice is exact anyway
    if option.low is not None:
        bounds["gt" if option.above else "ge"] = option.low
    if option.high is not None:
        bounds["le"] = option.high
    if option.kind is float:
        bounds["allow_inf_nan"] = False
    if option.many:  # repeatable: a list of such values (only text options are)
        return Optional[list[annotation]], Field(None, description=option.help)
    if option.words:  # a number or one of its words (`"frames": "all"`): the bounds go with the number
        annotation = Union[Annotated[annotation, Field(**bounds)], Literal[option.words]]
        bounds = {}
    return Optional[annotation], Field(None, description=option.help, **bounds)


def _other(name: str, required: bool = False) -> tuple[Any, Any]:
    annotation, _, help = OTHER_FIELDS[name]
    if required:
        return annotation, Field(..., alias=name, description=help)
    return Optional[annotation], Field(None, alias=name, description=help)


def _model(name: str, fields: dict[str, tuple[Any, Any]]) -> type[BaseModel]:
    held = {HELD.get(key, key): value for key, value in fields.items()}  # read and written by their aliases
    config = ConfigDict(extra="forbid", protected_namespaces=())
    return create_model(name, __config__=config, **held)  # type: ignore[call-overload, no-any-return]


HELD = {"model_config": "config_of_model"}  # pydantic reserves the attribute `model_config`


InvertFields = _model("Invert", {name: _declared(option) for name, option in INVERT.items()})
EditFields = _model(
    "Edit", {**{name: _declared(option) for name, option in EDIT.items()}, **{name: _other(name) for name in EDIT_ONLY}}
)


def _job(name: str, required: bool) -> type[BaseModel]:
    fields = {
        "name": _other("name"),
        "clip": _other("clip", required),
        "prompt": _other("prompt", required),
        "edits": _other("edits"),
        **{field: _other(field) for field in TUNE_ONLY},
        **{field: _declared(option) for field, option in TUNE.items()},
        "invert": (Optional[InvertFields], Field(None, description="options of tav invert")),
        "edit": (Optional[EditFields], Field(None, description="options of tav edit")),
    }
    return _model(name, fields)


JobFields = _job("Job", required=True)
DefaultFields = _job("Defaults", required=False)  # TOML's [defaults]: any job field, merged under every job
JOB_FIELDS = tuple(info.alias or name for name, info in JobFields.model_fields.items())


class JobFile(BaseModel):
    """A TOML batch file: [[job]] tables and an optional [defaults] table (JSON Lines: one Job per line)."""

    model_config = ConfigDict(extra="forbid", title="tav batch job file")
    job: list[JobFields]  # type: ignore[valid-type]
    defaults: Optional[DefaultFields] = None  # type: ignore[valid-type]


def job_file_schema() -> dict[str, Any]:
    """The JSON Schema of batch files: a TOML file's tables; a JSON Lines file's lines are `$defs.Job`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **JobFile.model_json_schema()}


def validate_job(data: dict[str, Any]) -> dict[str, Any]:
    """A job's fields, checked (ValueError naming every bad field, the way tav names them)."""
    normalized = _underscored(data)
    try:
        return JobFields.model_validate(normalized).model_dump(exclude_none=True, by_alias=True)
    except ValidationError as error:
        problems = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ValueError("; ".join(dict.fromkeys(_message(problem) for problem in problems))) from None


def _underscored(data: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint-every` reads as `checkpoint_every`, at the top and in the tables."""
    fixed = {key.replace("-", "_") if isinstance(key, str) else key: value for key, value in data.items()}
    for table in ("invert", "edit"):
        if isinstance(fixed.get(table), dict):
            fixed[table] = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in fixed[table].items()}
    return fixed


def _message(problem: Any) -> str:
    """One pydantic error as tav's message: the field, what it must be (from its declaration), the value."""
    loc = [str(part) for part in problem["loc"] if not isinstance(part, int)]
    loc = loc[: 2 if loc and loc[0] in ("invert", "edit") else 1]  # no union member's tag (`frames.constrained-int`)
    field = ".".join(loc)
    if problem["type"] == "extra_forbidden":
        known = tuple((EditFields if loc[0] == "edit" else InvertFields).model_fields) if len(loc) > 1 else JOB_FIELDS
        return f"unknown field {field!r}{closest(loc[-1], known)}"
    if problem["type"] == "missing":
        return f"field {field!r} is missing"
    if loc[-1] in ("invert", "edit") and len(loc) == 1:
        return f"field {field!r} must be a table of options"
    return f"field {field!r} must be {_requirement(loc)}, not {_shown(problem['input'])}"


def _requirement(loc: list[str]) -> str:
    name = loc[-1]
    table = {"invert": INVERT, "edit": EDIT}.get(loc[0], TUNE) if len(loc) > 1 else TUNE
    if name in table:
        return table[name].describe()
    return OTHER_FIELDS[name][1] if name in OTHER_FIELDS else "valid"


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
