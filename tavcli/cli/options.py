"""The command line's options, each declared once and shared by the commands that take it.

Numbers and choices come from their declarations in `tavcli.settings.options` (type, range, default, help),
so the command line, batch files and sidecars check them alike; this module only gives them their
flags, metavars and help panels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, cast

import typer

from tavcli.choices import Precision
from tavcli.cli.output import set_quiet
from tavcli.settings.config import DEFAULT_CLIP_MODEL
from tavcli.settings.options import SELECTION, TUNE, Option

__all__ = [
    "AllowPickleOpt",
    "ChosenFramesOpt",
    "ChosenStartOpt",
    "ChosenStrideOpt",
    "ClipModelOpt",
    "ClipProjectOpt",
    "CompileOpt",
    "DEFAULT_CLIP_MODEL",
    "DeviceOpt",
    "DryRunOpt",
    "ForceOpt",
    "FramesOpt",
    "HeightOpt",
    "JsonOpt",
    "ModelConfigOpt",
    "ModelOpt",
    "PrecisionOpt",
    "ProjectOpt",
    "QuietOpt",
    "RevisionOpt",
    "StartOpt",
    "StrideOpt",
    "VariantOpt",
    "WidthOpt",
    "WindowOpt",
    "YesOpt",
    "declared",
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
    return typer.Option(
        option.flag,
        *([short] if short else []),
        parser=option.parse if numeric else None,
        metavar=metavar or option.metavar,
        help=text,
        rich_help_panel=panel,
    )


Command = TypeVar("Command", bound=Callable[..., Any])


def settings_flags(parameter: str, options: dict[str, Option], panel: str) -> Callable[[Command], Command]:
    """Give a command one flag per field of its settings parameter `parameter` (a dataclass whose fields are
    declared `options`, e.g. `EditSettings`), in its place, and call it with the settings built from them by
    name: a field added to the settings is a flag of the command, with no change to the command."""

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        settings_type = signature.parameters[parameter].annotation
        flags = [
            inspect.Parameter(
                setting.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None if options[setting.name].many else options[setting.name].default,
                annotation=Annotated[_value_type(options[setting.name]), declared(options[setting.name], panel)],
            )
            for setting in fields(settings_type)
        ]
        params = list(signature.parameters.values())
        at = list(signature.parameters).index(parameter)

        @functools.wraps(command)
        def with_settings(**given: Any) -> Any:
            chosen = {setting.name: given.pop(setting.name) for setting in fields(settings_type)}
            return command(**given, **{parameter: settings_type(**chosen)})

        # typer reads the parameters from `__signature__` (inspect.signature does).
        cast(Any, with_settings).__signature__ = signature.replace(parameters=[*params[:at], *flags, *params[at + 1 :]])
        return cast(Command, with_settings)

    return decorate


def _value_type(option: Option) -> Any:
    """The type typer parses a declared option's value as: a choice is one of its values; a repeatable
    option a list of them (None when not given)."""
    one = Literal[option.allowed] if option.allowed else option.kind
    return Optional[list[one]] if option.many else one  # type: ignore[valid-type]


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

# The frame options of `tav tune`, also taken by `tav import` (as overrides of the reference's run).
FramesOpt = Annotated[int, declared(TUNE["frames"], FRAMES)]
StrideOpt = Annotated[int, declared(TUNE["stride"], FRAMES)]
StartOpt = Annotated[int, declared(TUNE["start"], FRAMES)]
WidthOpt = Annotated[int, declared(TUNE["width"], FRAMES)]
HeightOpt = Annotated[int, declared(TUNE["height"], FRAMES)]

# The frames `tav invert` and `tav edit` work on (default: the tuned ones).
ChosenFramesOpt = Annotated[Optional[str], declared(SELECTION["frames"], FRAMES, metavar="N|all")]
ChosenStrideOpt = Annotated[Optional[int], declared(SELECTION["stride"], FRAMES)]
ChosenStartOpt = Annotated[Optional[int], declared(SELECTION["start"], FRAMES)]
WindowOpt = Annotated[Optional[int], declared(SELECTION["window"], FRAMES)]
