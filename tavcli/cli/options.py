"""The command line's options, each declared once and shared by the commands that take it.

Numbers and choices come from their declarations in `tavcli.settings.options` (type, range, default, help),
so the command line, batch files and sidecars check them alike; this module only gives them their
flags, metavars and help panels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, cast

import typer

from tavcli.choices import Precision
from tavcli.cli.output import set_quiet
from tavcli.settings.config import DEFAULT_CLIP_MODEL
from tavcli.settings.option import Option
from tavcli.settings.options import EDIT, GUIDANCE

__all__ = [
    "AllowPickleOpt",
    "ClipModelOpt",
    "ClipProjectOpt",
    "CompileOpt",
    "DEFAULT_CLIP_MODEL",
    "DeviceOpt",
    "DryRunOpt",
    "ForceOpt",
    "JsonOpt",
    "ModelConfigOpt",
    "ModelOpt",
    "PrecisionOpt",
    "ProjectOpt",
    "QuietOpt",
    "RevisionOpt",
    "VariantOpt",
    "YesOpt",
    "declared",
    "guidance_flags",
    "settings_flags",
]

# Help panels.
RUN = "Hardware"
MODEL = "Model"
STORE = "Store"
FRAMES = "Frames"
TRAINING = "Training"
SAMPLING = "Sampling"
INVERSION = "Inversion"
ATTENTION = "Attention control"
OUTPUT = "Output"
CONTROL = "Control"
PREVIEW = "Previews"


def declared(
    option: Option, panel: str | None = None, *, short: str | None = None, help: str | None = None, metavar: str = ""
) -> Any:
    """A typer option from its declaration: numbers are parsed and range-checked as the command line is read."""
    numeric = option.kind in (int, float)
    text = (help or option.help) + (f" [{option.bounds()}]" if numeric and option.bounds() else "")
    if option.allowed:
        metavar = metavar or "|".join(option.allowed)
    # A switch can be turned off too: a model's own defaults may turn it on (`MODEL_DEFAULTS`).
    flag = f"{option.flag}/--no-{option.flag[2:]}" if option.kind is bool else option.flag
    return typer.Option(
        flag,
        *([short] if short else []),
        parser=option.parse if numeric else None,
        metavar=metavar or option.metavar,
        help=text,
        rich_help_panel=panel,
    )


Command = TypeVar("Command", bound=Callable[..., Any])


def settings_flags(
    parameter: str, options: dict[str, Option], panel: str, panels: Mapping[str, str] | None = None
) -> Callable[[Command], Command]:
    """Give a command one flag per field of its settings parameter `parameter` (a dataclass whose fields are
    declared `options`, e.g. `EditSettings`; a field is the option whose `attribute` it is), in its place, in
    `panel` (or the field's in `panels`), and call it with the settings built from them: a field added to the
    settings is a flag of the command, with no change to the command."""

    def decorate(command: Command) -> Command:
        settings_type = inspect.signature(command, eval_str=True).parameters[parameter].annotation
        of_field = {option.attribute: option for option in options.values()}
        flags = {
            setting.name: (
                _value_type(of_field[setting.name]),
                declared(of_field[setting.name], (panels or {}).get(setting.name, panel)),
                None if of_field[setting.name].many else of_field[setting.name].default,
            )
            for setting in fields(settings_type)
        }
        return _with_flags(command, parameter, flags, lambda chosen: settings_type(**chosen))

    return decorate


def guidance_flags(parameter: str, panel: str) -> Callable[[Command], Command]:
    """Give a command (`tav invert`) one flag per guidance option (`GUIDANCE`: what a null-text fit is made at),
    each None unless given, and call it with those given as `parameter`, by name: a new guidance setting is a
    flag of the command, with no change to the command."""
    flags = {
        name: (
            Optional[EDIT[name].kind],
            declared(
                EDIT[name],
                panel,
                help=f"Null-text: the edits' {EDIT[name].flag}, the fit's [default: {EDIT[name].default}].",
            ),
            None,
        )
        for name in GUIDANCE
    }
    return lambda command: _with_flags(
        command, parameter, flags, lambda given: {name: value for name, value in given.items() if value is not None}
    )


def _with_flags(
    command: Command,
    parameter: str,
    flags: dict[str, tuple[Any, Any, Any]],
    build: Callable[[dict[str, Any]], Any],
) -> Command:
    """`command` with its parameter `parameter` replaced by `flags` ({name: (type, typer option, default)}), in
    its place; called with `parameter` = `build` of the flags' values by name."""
    signature = inspect.signature(command, eval_str=True)
    params = list(signature.parameters.values())
    at = list(signature.parameters).index(parameter)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    added = [
        inspect.Parameter(name, kind, default=default, annotation=Annotated[value_type, option])
        for name, (value_type, option, default) in flags.items()
    ]

    @functools.wraps(command)
    def with_flags(**given: Any) -> Any:
        chosen = {name: given.pop(name) for name in flags}
        return command(**given, **{parameter: build(chosen)})

    # typer reads the parameters from `__signature__` (inspect.signature does).
    cast(Any, with_flags).__signature__ = signature.replace(parameters=[*params[:at], *added, *params[at + 1 :]])
    return cast(Command, with_flags)


def _value_type(option: Option) -> Any:
    """The type typer parses a declared option's value as: a choice is one of its values; a repeatable
    option a list of them; either None when not given, for an option whose default is None."""
    one = Literal[option.allowed] if option.allowed else option.kind
    if option.many:
        return Optional[list[one]]  # type: ignore[valid-type]
    return Optional[one] if option.default is None else one


QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress, notes or tables on stderr (errors still show).",
        callback=set_quiet,
        expose_value=False,
    ),
]
ProjectOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--project",
        "-p",
        metavar="PATH",
        help="Project directory [default: $TAV_PROJECT, else the only *.tav here].",
        show_default=False,
    ),
]
ClipProjectOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--project",
        "-p",
        metavar="PATH",
        help="Project directory [default: $TAV_PROJECT, else CLIP.tav in project_root or beside the clip].",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device",  # named: typer 0.27 took a metavar that is the name in capitals for the flag (--DEVICE)
        metavar="DEVICE",
        help="auto, cpu, cuda, cuda:N or mps [default: config, else auto].",
        rich_help_panel=RUN,
    ),
]
PrecisionOpt = Annotated[
    Optional[Precision],
    typer.Option(
        metavar="auto|fp32|fp16|bf16",
        help="auto = bf16 on CUDA GPUs that have it, else fp16; fp32 elsewhere [default: config, else auto].",
        rich_help_panel=RUN,
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help="Hub id, local diffusers folder, single-file checkpoint (.safetensors; .ckpt with --trust-pickle), "
        "or 'tiny' (built-in, offline) "
        "[default: $TAV_MODEL, tav.toml, config.toml, else CompVis/stable-diffusion-v1-4].",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
ModelConfigOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model-config",
        metavar="MODEL",
        help="For a single-file --model: the diffusers model it was fine-tuned from (hub id or local folder; "
        "'tiny' for tiny checkpoints), whose configs it is read with [default: $TAV_MODEL_CONFIG, tav.toml, "
        "config.toml, else diffusers picks one by the checkpoint's architecture, online].",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option(
        "--revision",
        metavar="REV",
        help="For a hub --model: the branch, tag or commit to use [default: main].",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option(
        "--variant",
        metavar="VARIANT",
        help="Weights variant to load, e.g. fp16 (files *.fp16.safetensors); 'none' for the main weights "
        "[default: fp16 for a half-precision tune when the model has it, else none].",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
VaeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--vae",
        metavar="PATH",
        help="A VAE to use instead of the model's own: a diffusers VAE folder or a .safetensors file "
        "(e.g. SDXL's fp16-fixed VAE). Part of the model's identity, so edits of the tune use it too.",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        "--allow-pickle",
        help="Also load pickled (.bin/.ckpt/.pt) weights, with torch's weights_only loader. Only for models you trust.",
        rich_help_panel=MODEL,
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the UNet (GPU; slow to start; rounds differently, so cached apart).",
        rich_help_panel=RUN,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even if the project has the result.")]
ClipModelOpt = Annotated[
    str,
    typer.Option(
        "--clip-model", metavar="MODEL", help="CLIP model for scoring: hub id or local folder.", rich_help_panel=OUTPUT
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="JSON Lines on stdout (the default when stdout is not a terminal).")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and change nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking.")]
