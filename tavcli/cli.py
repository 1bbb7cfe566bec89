"""The `tav` command line: thin Typer commands over `tavcli.workflow`.

Heavy libraries (torch, diffusers) are imported inside the commands, so `tav --help` starts fast.
Every command prints one JSON record per artifact on stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tavcli import __version__
from tavcli.errors import TavError

if TYPE_CHECKING:
    from tavcli.workflow import Artifact, Session

app = typer.Typer(
    name="tav",
    help=(
        "Tune-A-Video from the command line: tune Stable Diffusion on one clip and its description, "
        "then edit the clip with new prompts.\n\n"
        "Typical use:\n\n"
        '  tav tune skiing.mp4 "a man is skiing"        (creates skiing.tav/ beside the clip)\n\n'
        '  tav edit -p skiing.tav "a panda is skiing" "a man is skiing at sunset"\n\n'
        "Offline, try it with the built-in tiny model: tav demo"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Resize(str, Enum):
    crop = "crop"
    stretch = "stretch"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class FrameNorm(str, Enum):
    joint = "joint"
    frame = "frame"


class Format(str, Enum):
    mp4 = "mp4"
    gif = "gif"
    frames = "frames"


DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # tavcli.models.DEFAULT_MODEL, without importing torch
RUN = "Hardware"
MODEL = "Model"

ProjectOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--project", "-p", help="Project directory (default for edit/invert: the only *.tav here).", show_default=False
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)]
PrecisionOpt = Annotated[
    Precision, typer.Option(help="auto = fp16 on CUDA (mixed precision), fp32 on CPU.", rich_help_panel=RUN)
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Also load pickled (.bin) weights. Unpickling runs code: only for models you trust.",
        rich_help_panel=MODEL,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even if the project has the result.")]


def _session(device: str, precision: Precision, allow_pickle: bool) -> Session:
    from tavcli.runtime import resolve_runtime
    from tavcli.ui import RichReporter
    from tavcli.workflow import Session

    return Session(resolve_runtime(device, precision.value), RichReporter(), allow_pickle)


def _report(artifacts: list[Artifact]) -> None:
    from tavcli.ui import print_record, stderr

    for artifact in artifacts:
        print_record(artifact.record())
        state = "[green]cached[/green]" if artifact.cached else f"done in {artifact.seconds:.1f}s"
        stderr.print(f"{artifact.kind:<9} {state}  {artifact.path}")


@app.command()
def tune(
    video: Annotated[Path, typer.Argument(help="The clip: mp4, mov, webm, mkv or gif.", show_default=False)],
    prompt: Annotated[str, typer.Argument(help='What the clip shows, e.g. "a man is skiing".', show_default=False)],
    project: Annotated[
        Optional[Path], typer.Option("--project", "-p", help="Project directory [default: CLIP.tav beside the clip].")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Hub id, local diffusers folder, or 'tiny' (built-in, offline).",
            rich_help_panel=MODEL,
        ),
    ] = DEFAULT_MODEL,
    frames: Annotated[int, typer.Option(help="Number of frames to tune on.", rich_help_panel="Frames")] = 24,
    stride: Annotated[int, typer.Option(help="Take every S-th frame.", rich_help_panel="Frames")] = 2,
    start: Annotated[int, typer.Option(help="First frame (0-based).", rich_help_panel="Frames")] = 0,
    width: Annotated[
        int, typer.Option(help="Frame width (rounded to a multiple of 8).", rich_help_panel="Frames")
    ] = 512,
    height: Annotated[
        int, typer.Option(help="Frame height (rounded to a multiple of 8).", rich_help_panel="Frames")
    ] = 512,
    resize: Annotated[
        Resize,
        typer.Option(
            help="crop keeps the aspect ratio (centre crop); stretch is the reference's.", rich_help_panel="Frames"
        ),
    ] = Resize.crop,
    steps: Annotated[int, typer.Option(help="Training steps.", rich_help_panel="Training")] = 500,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.", rich_help_panel="Training")] = 3e-5,
    seed: Annotated[
        int, typer.Option(help="Seed for initial weights, noise and timesteps.", rich_help_panel="Training")
    ] = 33,
    frame_norm: Annotated[
        FrameNorm,
        typer.Option(
            help="ResNet GroupNorm statistics over the whole clip (reference) or per frame.", rich_help_panel=MODEL
        ),
    ] = FrameNorm.joint,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Trade compute for memory (same results).", rich_help_panel=RUN)
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Tune the model on one clip and its description (the reference's defaults).

    The clip is VAE-encoded once; only the attention query projections and the new temporal
    attention are trained, and only those tensors are saved in the project.

    Example: tav tune skiing.mp4 "a man is skiing" --steps 300
    """
    from tavcli.tune import TuneSettings
    from tavcli.video import FrameSelection
    from tavcli.workflow import default_project, frame_size
    from tavcli.workflow import tune as run_tune

    session = _session(device, precision, allow_pickle)
    size = frame_size(width, height, resize.value, session.reporter)
    artifacts = run_tune(
        session,
        video,
        prompt,
        project or default_project(video),
        model,
        FrameSelection(frames=frames, stride=stride, start=start),
        size,
        TuneSettings(steps=steps, learning_rate=lr, seed=seed, gradient_checkpointing=gradient_checkpointing),
        frame_norm=frame_norm.value,
        force=force,
    )
    _report(artifacts)
    tuned = artifacts[-1].details
    ratio = tuned["base_unet_bytes"] / tuned["delta_bytes"]
    from tavcli.ui import stderr

    stderr.print(f"delta {tuned['delta_bytes'] / 1e6:.2f} MB, {ratio:.0f}x smaller than the UNet")


@app.command()
def invert(
    project: ProjectOpt = None,
    steps: Annotated[int, typer.Option(help="DDIM inversion steps.")] = 50,
    prompt: Annotated[str, typer.Option(help="Prompt for inversion (the reference uses the empty prompt).")] = "",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """DDIM-invert the tuned clip into the noise that edits start from.

    `tav edit` runs this itself when the project has no inversion yet; run it to choose the steps.
    """
    from tavcli.workflow import find_project
    from tavcli.workflow import invert as run_invert

    session = _session(device, precision, allow_pickle)
    _report([run_invert(session, find_project(project), steps=steps, prompt=prompt, force=force)])


@app.command()
def edit(
    prompts: Annotated[
        list[str], typer.Argument(help="One or more edited descriptions; one clip each.", show_default=False)
    ],
    project: ProjectOpt = None,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.", rich_help_panel="Sampling")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.", rich_help_panel="Sampling")] = 12.5,
    negative: Annotated[
        str, typer.Option(help="Negative prompt (replaces the empty prompt).", rich_help_panel="Sampling")
    ] = "",
    seed: Annotated[
        int, typer.Option(help="Seed for DDIM noise (used when --eta > 0).", rich_help_panel="Sampling")
    ] = 33,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 is deterministic.", rich_help_panel="Sampling")] = 0.0,
    fmt: Annotated[
        Format,
        typer.Option("--format", "-f", help="mp4 (H.264), gif, or a folder of PNG frames.", rich_help_panel="Output"),
    ] = Format.mp4,
    fps: Annotated[
        Optional[float],
        typer.Option(help="Frame rate [default: source fps / stride].", rich_help_panel="Output", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="Output folder [default: PROJECT/renders].",
            rich_help_panel="Output",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Render the tuned clip with new prompts, one output (and a JSON sidecar) per prompt.

    Starts from the project's DDIM inversion, inverting first with --steps if there is none.

    Example: tav edit -p skiing.tav "a panda is skiing" "a man is skiing at sunset" --format gif
    """
    from tavcli.workflow import EditSettings, find_project
    from tavcli.workflow import edit as run_edit

    session = _session(device, precision, allow_pickle)
    settings = EditSettings(steps=steps, guidance=guidance, negative=negative, seed=seed, eta=eta)
    _report(run_edit(session, find_project(project), prompts, settings, out, fmt.value, fps, force))


@app.command()
def demo(
    project: Annotated[Path, typer.Option("--project", "-p", help="Where to put the demo project.")] = Path(
        "tav-demo.tav"
    ),
    steps: Annotated[int, typer.Option(help="Training steps.")] = 30,
) -> None:
    """Tune the built-in tiny model on the bundled skiing clip and render two edits (offline, CPU).

    The tiny model has random weights: the demo shows the whole pipeline and its speed, not pretty
    pictures. It runs the same code as:

      tav tune CLIP "a man is skiing" --model tiny --frames 8 --width 128 --height 128 --steps 30 -p tav-demo.tav

      tav edit -p tav-demo.tav "a panda is skiing" "a man is skiing at sunset" --steps 20
    """
    from tavcli.tune import TuneSettings
    from tavcli.video import FrameSelection, FrameSize
    from tavcli.workflow import EditSettings
    from tavcli.workflow import edit as run_edit
    from tavcli.workflow import tune as run_tune

    session = _session("auto", Precision.auto, False)
    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        artifacts = run_tune(
            session,
            clip,
            "a man is skiing",
            project,
            "tiny",
            FrameSelection(frames=8, stride=2),
            FrameSize(width=128, height=128),
            TuneSettings(steps=steps),
        )
    prompts = ["a panda is skiing", "a man is skiing at sunset"]
    artifacts += run_edit(session, project, prompts, EditSettings(steps=20))
    _report(artifacts)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tav {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Set TAV_DEBUG=1 to see tracebacks."""


def main() -> None:
    """Entry point: user errors become one red line and exit status 1 (TAV_DEBUG=1 shows the traceback).

    File-system failures (permissions, a full disk) are the environment's, not bugs: one line too.
    """
    try:
        app()
    except (TavError, OSError) as error:
        if os.environ.get("TAV_DEBUG"):
            raise
        from rich.console import Console
        from rich.markup import escape

        message, hint = (error.message, error.hint) if isinstance(error, TavError) else (str(error), None)
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        shown_hint = f" [dim]({escape(hint)})[/dim]" if hint else ""
        console.print(f"[bold red]error:[/bold red] {escape(message)}{shown_hint}")
        sys.exit(1)
