"""The `tav` command line: thin Typer commands over `tavcli.workflow`.

Options are built from their declarations in `tavcli.options`, so a bad value is refused while the
command line is read; each command then builds its request (`tavcli.requests`) and checks its
inputs before torch and diffusers are imported, so every mistake is reported in well under a
second. Every command prints one JSON record per artifact on stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from tavcli import __version__
from tavcli.config import DEFAULT_CLIP_MODEL, Setting
from tavcli.errors import Interrupted, TavError
from tavcli.options import EDIT, INVERT, TUNE, FrameNorm, Option, OutputFormat, Precision, ResizeMode

if TYPE_CHECKING:
    from tavcli.housekeeping import Listing
    from tavcli.store import Project
    from tavcli.workflow import Artifact, Session

__all__ = ["app", "main"]

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
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RUN = "Hardware"
MODEL = "Model"
STORE = "Store"
FRAMES = "Frames"
TRAINING = "Training"
SAMPLING = "Sampling"
OUTPUT = "Output"
CONTROL = "Control"


def _declared(
    option: Option, panel: str | None = None, *, short: str | None = None, help: str | None = None, metavar: str = ""
) -> Any:
    """A typer option from its declaration: numbers are parsed and range-checked as the command line is read."""
    numeric = option.kind in (int, float)
    text = (help or option.help) + (f" [{option.bounds()}]" if numeric and option.bounds() else "")
    return typer.Option(
        option.flag,
        *([short] if short else []),
        parser=option.parse if numeric else None,
        metavar=metavar or (option.metavar if numeric else None),
        help=text,
        rich_help_panel=panel,
    )


ProjectOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--project",
        "-p",
        help="Project directory [default: $TAV_PROJECT, else the only *.tav here].",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(help="auto, cpu, cuda, cuda:N or mps [default: config, else auto].", rich_help_panel=RUN),
]
PrecisionOpt = Annotated[
    Optional[Precision],
    typer.Option(
        help="auto = fp16 on CUDA (mixed precision), fp32 on CPU [default: config, else auto].", rich_help_panel=RUN
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
    str, typer.Option("--clip-model", help="CLIP model for scoring: hub id or local folder.", rich_help_panel=OUTPUT)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout instead of a table.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and change nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking.")]

# The tune options shared by `tav tune` (and, as overrides of a reference run, `tav import`).
FramesOpt = Annotated[int, _declared(TUNE["frames"], FRAMES)]
StrideOpt = Annotated[int, _declared(TUNE["stride"], FRAMES)]
StartOpt = Annotated[int, _declared(TUNE["start"], FRAMES)]
WidthOpt = Annotated[int, _declared(TUNE["width"], FRAMES)]
HeightOpt = Annotated[int, _declared(TUNE["height"], FRAMES)]


def _settings(project: Path | None, **flags: str | None) -> dict[str, Setting]:
    from tavcli.config import resolve_settings

    return resolve_settings(flags, project)


def _model_name(settings: dict[str, Setting], loras: list[str] | None = None) -> str:
    """The model a command tunes: --model with its --model-config and --lora options folded in."""
    from tavcli.model_name import model_name

    base, config = settings["model"].value or "", settings["model_config"]
    if config.source == "flag":
        return model_name(base, config.value, loras or [])
    return model_name(base, loras=loras or [], default_config=config.value)


def _session(settings: dict[str, Setting], allow_pickle: bool, compile_unet: bool = False) -> Session:
    from tavcli.runtime import resolve_runtime
    from tavcli.ui import RichReporter
    from tavcli.workflow import Session

    device, precision = settings["device"].value or "auto", settings["precision"].value or "auto"
    runtime = resolve_runtime(device, precision, compile=compile_unet)
    return Session(runtime, RichReporter(), allow_pickle)


def _project_for_clip(flag: Path | None, settings: dict[str, Setting]) -> Callable[[Path], Path]:
    """Where a clip's project is: --project, $TAV_PROJECT, PROJECT_ROOT/CLIP.tav (config), else beside the clip."""
    from tavcli.config import default_project, project_from

    chosen = project_from(flag)
    root = settings["project_root"].value
    if chosen is not None:
        return lambda clip: Path(chosen.value or "")
    if root:
        return lambda clip: Path(root).expanduser() / default_project(clip).name
    return default_project


def _existing_project(flag: Path | None) -> Path:
    from tavcli.config import find_project, project_from

    chosen = project_from(flag)
    return find_project(Path(chosen.value or "") if chosen else None)


def _report(artifacts: list[Artifact]) -> None:
    from tavcli.ui import print_record, stderr

    for artifact in artifacts:
        print_record(artifact.record())
        state = "[green]cached[/green]" if artifact.cached else f"done in {artifact.seconds:.1f}s"
        stderr.print(f"{artifact.kind:<9} {state}  {escape(str(artifact.path))}")


@app.command()
def tune(
    video: Annotated[Path, typer.Argument(help="The clip: mp4, mov, webm, mkv or gif.", show_default=False)],
    prompt: Annotated[str, typer.Argument(help='What the clip shows, e.g. "a man is skiing".', show_default=False)],
    project: Annotated[
        Optional[Path],
        typer.Option(
            "--project",
            "-p",
            help="Project directory [default: $TAV_PROJECT, else CLIP.tav in project_root or beside the clip].",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    lora: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Fuse a LoRA (.safetensors file or folder) into the base model first: PATH or PATH:SCALE; repeatable.",
            metavar="PATH[:SCALE]",
            rich_help_panel=MODEL,
            show_default=False,
        ),
    ] = None,
    frames: FramesOpt = TUNE["frames"].default,
    stride: StrideOpt = TUNE["stride"].default,
    start: StartOpt = TUNE["start"].default,
    width: WidthOpt = TUNE["width"].default,
    height: HeightOpt = TUNE["height"].default,
    resize: Annotated[ResizeMode, _declared(TUNE["resize"], FRAMES)] = TUNE["resize"].default,
    steps: Annotated[int, _declared(TUNE["steps"], TRAINING)] = TUNE["steps"].default,
    lr: Annotated[float, _declared(TUNE["lr"], TRAINING)] = TUNE["lr"].default,
    seed: Annotated[int, _declared(TUNE["seed"], TRAINING)] = TUNE["seed"].default,
    frame_norm: Annotated[FrameNorm, _declared(TUNE["frame_norm"], MODEL)] = TUNE["frame_norm"].default,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Trade compute for memory (same results).", rich_help_panel=RUN)
    ] = False,
    checkpoint_every: Annotated[int, _declared(TUNE["checkpoint_every"], STORE)] = TUNE["checkpoint_every"].default,
    compile_unet: CompileOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what is cached and the estimated peak memory; train nothing.")
    ] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Tune the model on one clip and its description (the reference's defaults).

    The clip is VAE-encoded once; only the attention query projections and the new temporal
    attention are trained, and only those tensors are saved in the project. Ctrl-C saves the
    training state: the same command resumes it, and a larger --steps continues a finished tune.

    Examples:

      tav tune skiing.mp4 "a man is skiing"

      tav tune skiing.mp4 "a man is skiing" --steps 300 --frames 16 --model ./my-sd-folder
    """
    from tavcli.requests import TuneRequest, TuneSettings, frame_size
    from tavcli.ui import RichReporter
    from tavcli.video import FrameSelection, probe

    project_dir = _project_for_clip(project, _settings(None))(video)
    settings = _settings(project_dir, model=model, model_config=model_config, device=device, precision=precision)
    request = TuneRequest(
        video,
        prompt,
        project_dir,
        _model_name(settings, lora),
        FrameSelection(frames, stride, start),
        frame_size(width, height, resize, RichReporter()),
        TuneSettings(steps, lr, seed, gradient_checkpointing, checkpoint_every),
        frame_norm,
    )
    probe(video, request.selection)  # a bad or short clip is reported before anything heavy loads
    session = _session(settings, allow_pickle, compile_unet)
    if dry_run:
        from tavcli.ui import print_record, stderr
        from tavcli.workflow import tune_plan

        plan = tune_plan(session, request, force=force)
        print_record(plan)
        tune_state = "cached" if plan["tune"]["cached"] else f"to train (from step {plan['tune']['resume_from'] or 0})"
        stderr.print(f"tune {plan['tune']['key']}: {tune_state}\nmemory: {plan['memory']['summary']}")
        return
    from tavcli.workflow import tune as run_tune

    artifacts = run_tune(session, request, force=force)
    _report(artifacts)
    tuned = artifacts[-1].details
    ratio = tuned["base_unet_bytes"] / tuned["delta_bytes"]
    from tavcli.ui import stderr

    stderr.print(f"delta {tuned['delta_bytes'] / 1e6:.2f} MB, {ratio:.0f}x smaller than the UNet")


@app.command()
def invert(
    project: ProjectOpt = None,
    steps: Annotated[int, _declared(INVERT["steps"])] = INVERT["steps"].default,
    prompt: Annotated[str, _declared(INVERT["prompt"], metavar="PROMPT")] = INVERT["prompt"].default,
    compile_unet: CompileOpt = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """DDIM-invert the tuned clip into the noise that edits start from.

    `tav edit` runs this itself when the project has no inversion yet; run it to choose the steps
    or the inversion prompt. The new inversion becomes the one `tav edit` uses.

    Example: tav invert -p skiing.tav --steps 50
    """
    project_dir = _existing_project(project)
    session = _session(_settings(project_dir, device=device, precision=precision), allow_pickle, compile_unet)
    from tavcli.workflow import invert as run_invert

    _report([run_invert(session, project_dir, steps=steps, prompt=prompt, force=force)])


@app.command()
def edit(
    prompts: Annotated[
        Optional[list[str]],
        typer.Argument(help="One or more edited descriptions; one clip each.", metavar="PROMPT...", show_default=False),
    ] = None,
    project: ProjectOpt = None,
    steps: Annotated[int, _declared(EDIT["steps"], SAMPLING)] = EDIT["steps"].default,
    guidance: Annotated[float, _declared(EDIT["guidance"], SAMPLING)] = EDIT["guidance"].default,
    negative: Annotated[str, _declared(EDIT["negative"], SAMPLING, metavar="PROMPT")] = EDIT["negative"].default,
    seed: Annotated[int, _declared(EDIT["seed"], SAMPLING)] = EDIT["seed"].default,
    eta: Annotated[float, _declared(EDIT["eta"], SAMPLING)] = EDIT["eta"].default,
    fmt: Annotated[OutputFormat, _declared(EDIT["format"], OUTPUT, short="-f")] = EDIT["format"].default,
    fps: Annotated[Optional[float], _declared(EDIT["fps"], OUTPUT)] = EDIT["fps"].default,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o", help="Output folder [default: PROJECT/renders].", rich_help_panel=OUTPUT, show_default=False
        ),
    ] = None,
    batch_size: Annotated[int, _declared(EDIT["batch_size"], RUN)] = EDIT["batch_size"].default,
    compile_unet: CompileOpt = False,
    control: Annotated[
        Optional[str],
        typer.Option(
            help="Condition each frame with a ControlNet: canny, depth, pose, seg, scribble, normal, lineart...",
            rich_help_panel=CONTROL,
            show_default=False,
        ),
    ] = None,
    control_model: Annotated[
        Optional[str],
        typer.Option(
            help="The ControlNet: hub id or local folder (needed with --control).",
            metavar="MODEL",
            rich_help_panel=CONTROL,
        ),
    ] = None,
    control_video: Annotated[
        Optional[Path],
        typer.Option(
            help="A clip of condition maps (e.g. a pose sequence), sampled like the source [canny: computed from it].",
            rich_help_panel=CONTROL,
            show_default=False,
        ),
    ] = None,
    control_scale: Annotated[float, _declared(EDIT["control_scale"], CONTROL)] = EDIT["control_scale"].default,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid",
            help="Also write source | edits side by side (mp4, GIF) and a PNG contact sheet.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval", help="Score each output with CLIP as it renders (see tav eval).", rich_help_panel=OUTPUT
        ),
    ] = False,
    clip_model: ClipModelOpt = DEFAULT_CLIP_MODEL,
    from_sidecar: Annotated[
        Optional[Path],
        typer.Option(
            "--from-sidecar",
            help="Render an output again from its JSON sidecar (its project, tune and settings).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Render the tuned clip with new prompts, one output (and a JSON sidecar) per prompt.

    Starts from the project's DDIM inversion, inverting first with --steps if there is none.
    Outputs are named PROMPT-KEY.mp4 (with the rate when --fps differs from the source's); a
    rerun reuses every output whose edit, format and rate are unchanged.

    Examples:

      tav edit -p skiing.tav "a panda is skiing" "a man is skiing at sunset"

      tav edit -p skiing.tav "a panda is skiing" --format gif --fps 8 --guidance 7.5
    """
    if from_sidecar is not None:
        if prompts:
            raise TavError("give prompts or --from-sidecar, not both")
        from tavcli.sidecar import recorded_edit

        recorded = recorded_edit(from_sidecar, out)  # checked before anything heavy loads
        session = _session(_settings(None, device=device, precision=precision), allow_pickle, compile_unet)
        from tavcli.workflow import edit_from_sidecar

        _report(edit_from_sidecar(session, recorded, force))
        return
    from tavcli.requests import EditRequest, EditSettings, control_spec

    request = EditRequest(
        _existing_project(project),
        prompts or [],
        EditSettings(steps, guidance, negative, seed, eta),
        out,
        fmt,
        fps,
        batch_size,
        control_spec(control, control_model, control_video, control_scale),
    )
    session = _session(_settings(request.project, device=device, precision=precision), allow_pickle, compile_unet)
    from tavcli.workflow import edit as run_edit

    artifacts = run_edit(session, request, force)
    if evaluate:
        from tavcli.metrics import ClipScorer, evaluate_output

        scorer = ClipScorer(clip_model, session.runtime.device)
        for artifact in artifacts:
            scores = evaluate_output(scorer, artifact.path)
            artifact.details["scores"] = {k: v for k, v in scores.items() if k not in ("path", "prompt")}
    if grid:
        from tavcli.workflow import render_grid

        artifacts.append(render_grid(session, request.project, artifacts, fps))
    _report(artifacts)


@app.command()
def demo(
    project: Annotated[Path, typer.Option("--project", "-p", help="Where to put the demo project.")] = Path(
        "tav-demo.tav"
    ),
    steps: Annotated[int, _declared(TUNE["steps"], help="Training steps.")] = 30,
) -> None:
    """Tune the built-in tiny model on the bundled skiing clip and render two edits (offline, CPU).

    The tiny model has random weights: the demo shows the whole pipeline and its speed, not pretty
    pictures. It runs the same code as:

      tav tune CLIP "a man is skiing" --model tiny --frames 8 --width 128 --height 128 --steps 30 -p tav-demo.tav

      tav edit -p tav-demo.tav "a panda is skiing" "a man is skiing at sunset" --steps 20
    """
    from tavcli.requests import EditRequest, EditSettings, TuneRequest, TuneSettings
    from tavcli.video import FrameSelection, FrameSize

    session = _session(_settings(None, model="tiny"), allow_pickle=False)
    from tavcli.workflow import edit as run_edit
    from tavcli.workflow import tune as run_tune

    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        request = TuneRequest(
            clip,
            "a man is skiing",
            project,
            "tiny",
            FrameSelection(frames=8, stride=2),
            FrameSize(width=128, height=128),
            TuneSettings(steps=steps),
        )
        artifacts = run_tune(session, request)
    prompts = ["a panda is skiing", "a man is skiing at sunset"]
    artifacts += run_edit(session, EditRequest(project, prompts, EditSettings(steps=20)))
    _report(artifacts)


@app.command()
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
            help="Confine every write of the batch (projects, outputs) to this folder: for job files you did "
            "not write yourself.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Run many tune/invert/edit jobs from a TOML file ([[job]] tables) or JSON Lines.

    Every job is checked before any work starts. Work shared by jobs (one clip tuned once, one model
    loaded once) is done once. stdout gets one JSON object per artifact or failed job; the exit
    status is 0 only if every job succeeded. Under `accelerate launch` the jobs are split across
    the processes, one device each. See docs/batch.md.

    Examples:

      tav batch jobs.toml

      cat jobs.jsonl | tav batch - --root ./out
    """
    from tavcli.batch import BatchContext, assign, failure_record, parse_jobs, read_jobs
    from tavcli.ui import print_record, stderr

    settings = _settings(None, model=model, model_config=model_config, device=device, precision=precision)
    context = BatchContext(
        model=settings["model"].value or "",
        model_config=settings["model_config"].value,
        project_for=_project_for_clip(None, settings),
        root=root,
    )
    jobs, problems = parse_jobs(*read_jobs(jobs_file), context)
    for problem in problems:
        stderr.print(f"[bold red]invalid job:[/bold red] {escape(str(problem))}")
    if problems and not keep_going:
        raise TavError(
            f"{len(problems)} of {len(jobs) + len(problems)} jobs are invalid; nothing was run",
            "fix them, or pass --keep-going to run the valid ones",
        )
    process, processes, chosen_device = _process_slot(settings["device"].value or "auto")
    settings["device"] = Setting(chosen_device, settings["device"].source)
    session = _session(settings, allow_pickle)
    mine = assign(jobs, process, processes)
    if processes > 1:
        stderr.print(
            f"[dim]process {process + 1} of {processes} on {chosen_device}: {len(mine)} of {len(jobs)} jobs[/dim]"
        )
    if process == 0:
        for problem in problems:
            print_record(failure_record(problem))
    from tavcli.batch import plan_jobs, run_jobs

    if dry_run:
        rows = plan_jobs(session, mine, context)
        for row in rows:
            print_record(row)
        _print_plan(rows)
        return
    if not run_jobs(session, mine, context, keep_going, print_record) or problems:
        raise typer.Exit(1)


def _process_slot(device: str) -> tuple[int, int, str]:
    """(index, count, device) of this process: under `accelerate launch`, one device per process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    chosen = device if device not in ("auto", "cuda") or state.device.type != "cuda" else str(state.device)
    return state.process_index, state.num_processes, "cpu" if state.device.type == "cpu" else chosen


def _print_plan(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from tavcli.ui import stderr

    table = Table(title="plan", title_justify="left")
    for column in ("job", "step", "key", "action"):
        table.add_column(column)
    for row in rows:
        action = "[green]reuse[/green]" if row["cached"] else "[yellow]compute[/yellow]"
        if row.get("resume_from"):
            action += f" from step {row['resume_from']}"
        table.add_row(row["job"], row["kind"] + (f": {row['prompt']}" if row.get("prompt") else ""), row["key"], action)
    stderr.print(table)


@app.command("import")
def import_reference(
    folder: Annotated[Path, typer.Argument(help="Output folder of the reference Tune-A-Video training script.")],
    clip: Annotated[
        Optional[Path], typer.Option(help="The tuned clip [default: train_data.video_path].", show_default=False)
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(help="Its description [default: train_data.prompt].", metavar="PROMPT", show_default=False),
    ] = None,
    project: Annotated[
        Optional[Path],
        typer.Option("--project", "-p", help="Project directory [default: as for tav tune].", show_default=False),
    ] = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    frames: Annotated[Optional[int], _declared(TUNE["frames"], help="[default: n_sample_frames, else 24]")] = None,
    stride: Annotated[Optional[int], _declared(TUNE["stride"], help="[default: sample_frame_rate, else 2]")] = None,
    start: Annotated[Optional[int], _declared(TUNE["start"], help="[default: sample_start_idx, else 0]")] = None,
    width: Annotated[Optional[int], _declared(TUNE["width"], help="[default: width, else 512]")] = None,
    height: Annotated[Optional[int], _declared(TUNE["height"], help="[default: height, else 512]")] = None,
    device: DeviceOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Import a model folder saved by the reference Tune-A-Video script as a tune, so its work is kept.

    Reads unet/ (the full video UNet) and config.yaml (clip, prompt, frames, size, steps), checks
    that the frozen weights are the base model's, stores only the tuned tensors, and makes the
    tune the project's current one: then `tav edit` works as after `tav tune`.

    Example: tav import outputs/man-skiing --model ./stable-diffusion-v1-4
    """
    from tavcli.importing import read_reference
    from tavcli.requests import TuneRequest, TuneSettings, frame_size
    from tavcli.video import FrameSelection, probe

    recorded = read_reference(folder, allow_pickle).settings
    clip_path = clip or (folder / recorded["clip"] if recorded.get("clip") else None)
    if clip_path is not None and not clip_path.exists() and recorded.get("clip"):
        clip_path = Path(recorded["clip"])  # relative to where the reference ran, often the current folder
    text = prompt or recorded.get("prompt")
    if clip_path is None or not text:
        raise TavError("which clip and prompt was it tuned on? config.yaml does not say", "pass --clip and --prompt")
    project_dir = _project_for_clip(project, _settings(None))(clip_path)
    settings = _settings(
        project_dir, model=model or recorded.get("base_model"), model_config=model_config, device=device
    )
    from tavcli.ui import RichReporter

    request = TuneRequest(
        clip_path,
        text,
        project_dir,
        _model_name(settings),
        FrameSelection(
            frames=frames or recorded.get("frames") or 24,
            stride=stride or recorded.get("stride") or 2,
            start=start if start is not None else recorded.get("start") or 0,
        ),
        frame_size(
            width or recorded.get("width") or 512, height or recorded.get("height") or 512, "stretch", RichReporter()
        ),
        TuneSettings(
            steps=recorded.get("steps") or 500,
            learning_rate=recorded.get("learning_rate") or 3e-5,
            seed=recorded.get("seed") or 33,
        ),
    )
    probe(clip_path, request.selection)
    session = _session(settings, allow_pickle)
    from tavcli.workflow import import_tune

    _report(import_tune(session, folder, request))


@app.command("eval")
def evaluate_outputs(
    outputs: Annotated[
        list[Path],
        typer.Argument(
            help="Rendered outputs: mp4/gif files or frames folders.", metavar="OUTPUT...", show_default=False
        ),
    ],
    prompt: Annotated[
        Optional[str],
        typer.Option(
            help="Prompt to score against [default: each output's sidecar prompt].",
            metavar="PROMPT",
            show_default=False,
        ),
    ] = None,
    clip_model: ClipModelOpt = DEFAULT_CLIP_MODEL,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Score outputs with CLIP: frame consistency and text faithfulness (the paper's metrics).

    Frame consistency is the mean cosine similarity of the CLIP image embeddings of all pairs of
    frames; text faithfulness the mean cosine similarity of each frame with the prompt. The scores
    are also written into each output's sidecar.

    Example: tav eval tav-demo.tav/renders/*.mp4 --clip-model ./clip-vit-large-patch14
    """
    for output in outputs:
        if not output.is_dir():
            from tavcli.inputs import require_regular_file

            require_regular_file(output, "video file")
    from tavcli.metrics import ClipScorer, evaluate_output
    from tavcli.runtime import resolve_runtime
    from tavcli.ui import print_record, stderr

    settings = _settings(None, device=device)
    scorer = ClipScorer(clip_model, resolve_runtime(settings["device"].value or "auto").device)
    results = []
    with _progress("scoring", len(outputs)) as advance:
        for output in outputs:
            results.append(evaluate_output(scorer, output, prompt))
            advance()
    if as_json:
        for result in results:
            print_record(result)
        return
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"CLIP: {clip_model}", title_justify="left")
    for column in ("output", "prompt", "frames", "consistency", "faithfulness"):
        table.add_column(column, justify="right" if column in ("frames", "consistency", "faithfulness") else "left")
    for result in results:
        table.add_row(
            escape(Path(str(result["path"])).name),
            escape(str(result["prompt"])),
            str(result["frames"]),
            f"{result['frame_consistency']:.4f}",
            f"{result['text_faithfulness']:.4f}",
        )
    stderr.print(table)


@app.command("ls")
def list_store(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """List the project's entries: what each is, what it was computed from, its size and date.

    Damaged entries (unreadable metadata, truncated payloads or checkpoints, a damaged project.json)
    are listed as damaged and never hide the rest; `tav verify` also checks every payload's bytes.
    """
    from tavcli.housekeeping import listing
    from tavcli.ui import print_record, stderr

    store = _open_store(project)
    rows = listing(store)
    current = _current_pointers(store)
    if as_json:
        for row in rows:
            print_record({**row.record(), "current": row.key in current})
        return
    from rich import box
    from rich.table import Table

    title = f"{store.root}  ({_size(sum(r.bytes for r in rows))})"
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("kind", "key", "what", "from", "size", "created"):
        wraps = column == "what"
        table.add_column(
            column,
            justify="right" if column == "size" else "left",
            no_wrap=not wraps,
            min_width=16 if column == "what" else None,
        )
    for row in rows:
        marker = "*" if row.key in current else ""
        what = escape(_describe(row)) if row.state == "complete" else f"[red]{escape(row.state)}[/red]"
        parent = row.parent.split("/")[-1][:8] if row.parent else ""  # its kind follows from this row's
        created = (row.created or "")[5:16].replace("T", " ")
        table.add_row(row.kind, row.key[:8] + marker, what, parent, _size(row.bytes), created)
    stderr.print(table)
    stderr.print("[dim]* the tune and inversion `tav edit` uses now[/dim]")


def _current_pointers(store: Project) -> set[str]:
    """The keys `project.json` points at (none when it is damaged: `tav ls` lists it as such)."""
    try:
        state = store.state
    except TavError:
        return set()
    return {str(state[name]) for name in ("tune", "inversion") if state.get(name)}


@app.command("rm")
def remove(
    keys: Annotated[
        list[str], typer.Argument(help="Entry keys (a unique prefix is enough) or KIND/KEY.", metavar="KEY...")
    ],
    project: ProjectOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
) -> None:
    """Remove entries and everything computed from them (inversions and edits of a tune, their renders
    and grids), listing every file first.

    References go first: pointers and `meta.json`, then the payload, so an interrupted removal never
    leaves an entry that looks complete but is not.
    """
    from tavcli.housekeeping import dependents, listing

    store = _open_store(project)
    rows = listing(store)
    targets = [_match(rows, key) for key in keys]
    _remove_with_plan(store, dependents(store, targets), "remove", dry_run, yes)


@app.command("gc")
def collect_garbage(
    project: ProjectOpt = None,
    checkpoints: Annotated[
        bool, typer.Option("--checkpoints", help="Also remove resumable training states (tunes stay usable).")
    ] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
) -> None:
    """Remove what nothing uses or nothing can use: interrupted and damaged entries and checkpoints, entries
    whose source is gone, renders and grids of removed edits, a damaged project.json, stale temp files.

    Work a live process is doing is left alone.
    """
    from tavcli.housekeeping import garbage

    store = _open_store(project)
    _remove_with_plan(store, garbage(store, checkpoints), "collect", dry_run, yes)


@app.command()
def verify(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Check every entry and checkpoint: metadata, payload SHA-256, NaN or inf values, project.json.

    Exits with status 1 if anything is damaged or incomplete, naming the `tav rm`/`tav gc` that clears it.
    """
    from tavcli.checkpoints import Checkpoints
    from tavcli.housekeeping import listing
    from tavcli.store import Entry
    from tavcli.ui import print_record, stderr

    store = _open_store(project)
    bad = 0
    rows = listing(store)
    with _progress("verifying", len(rows)) as advance:
        for row in rows:
            problems = [] if row.state == "complete" else [row.state.removeprefix("damaged: ")]
            if not problems and row.kind == "checkpoints":
                problems = Checkpoints(row.path).problems(full=True)
            elif not problems:
                problems = Entry(row.kind, row.key, row.path, row.spec).problems()
            bad += bool(problems)
            fix = _fix_for(store, row)
            if as_json:
                record = {"kind": row.kind, "key": row.key, "path": str(row.path), "ok": not problems}
                print_record({**record, "problems": problems, "fix": fix if problems else None})
            elif problems:
                stderr.print(
                    f"[red]damaged[/red] {row.kind}/{row.key}: {escape('; '.join(problems))} [dim]({fix})[/dim]"
                )
            advance()
    stderr.print(f"{len(rows) - bad} of {len(rows)} entries ok" + (f", [red]{bad} damaged[/red]" if bad else ""))
    if bad:
        raise typer.Exit(1)


def _fix_for(store: Project, row: Listing) -> str:
    """The command that clears a damaged row."""
    if row.kind == "project":
        return f"`tav gc -p {store.root}` removes it; it is then rebuilt from the entries"
    return f"`tav rm {row.kind}/{row.key} -p {store.root}` or `tav gc -p {store.root}` removes it"


@app.command("config")
def show_config(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Show the effective settings and where each came from.

    Precedence: flag > environment (TAV_MODEL, TAV_DEVICE, TAV_PRECISION, TAV_PROJECT) > the project's
    tav.toml > the user's config.toml > default.
    """
    from tavcli.config import PROJECT_FILE, as_dict, chosen_project, user_config_path
    from tavcli.ui import print_record, stderr

    chosen = chosen_project(project)
    project_dir = Path(chosen.value or "") if chosen else None
    settings = _settings(project_dir)
    files = {
        "user config": str(user_config_path()),
        "project config": str(project_dir / PROJECT_FILE) if project_dir else None,
    }
    if as_json:
        print_record(
            {
                **as_dict(settings),
                "project": chosen and {"value": chosen.value, "source": chosen.source},
                "files": files,
            }
        )
        return
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for key, setting in [*settings.items(), ("project", chosen or Setting(None, "none"))]:
        table.add_row(key, escape(str(setting.value)), escape(setting.source))
    stderr.print(table)
    for name, path in files.items():
        if path:
            exists = "" if Path(path).is_file() else " [dim](does not exist)[/dim]"
            stderr.print(f"{name}: {escape(path)}{exists}")


def _open_store(flag: Path | None) -> Project:
    from tavcli.store import Project

    root = _existing_project(flag)
    if not root.is_dir():
        raise TavError(f"no project at {root}", "`tav tune CLIP PROMPT` creates one")
    store = Project(root)
    store.check_version()
    return store


def _match(rows: list[Listing], given: str) -> Listing:
    kind, _, key = given.rpartition("/")
    found = [r for r in rows if r.key.startswith(key) and (not kind or r.kind == kind)]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries ({', '.join(f'{r.kind}/{r.key}' for r in found)})"
        raise TavError(f"{what} match {given!r}", "see `tav ls` for the keys; give more digits or KIND/KEY")
    return found[0]


def _remove_with_plan(store: Project, rows: list[Listing], verb: str, dry_run: bool, yes: bool) -> None:
    """Show what goes, every file of it, and the bytes it frees; then (after --yes or a confirmation) remove it."""
    from tavcli.housekeeping import removal_files, remove
    from tavcli.ui import print_record, stderr

    freed = sum(row.bytes for row in rows)
    for row in rows:
        why = _describe(row) if row.state == "complete" else row.state
        stderr.print(f"  {row.kind}/{row.key}  {_size(row.bytes):>9}  [dim]{escape(why)}[/dim]")
        for path in removal_files(store, row):
            stderr.print(f"      [dim]{escape(str(path))}[/dim]")
    plural = "entry" if len(rows) == 1 else "entries"
    stderr.print(f"{'would free' if dry_run else 'frees'} {_size(freed)} in {len(rows)} {plural}")
    if dry_run or not rows:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise TavError("not confirmed: nothing was removed", f"pass --yes to {verb} without asking")
        typer.confirm(f"{verb.capitalize()} {len(rows)} entries?", abort=True)
    for row in rows:
        remove(store, row)
        print_record({"removed": f"{row.kind}/{row.key}", "path": str(row.path), "bytes": row.bytes})


def _describe(row: Listing) -> str:
    spec = row.spec
    if row.kind == "checkpoints":
        return f"{spec.get('prompt', '')!r} at steps {', '.join(map(str, spec.get('steps', [])))}"
    if row.kind == "tunes":
        return f"{spec.get('prompt')!r}, {spec.get('steps')} steps"
    if row.kind == "inversions":
        return f"{spec.get('steps')} steps"
    if row.kind == "edits":
        return f"{spec.get('prompt')!r}, {spec.get('steps')} steps, guidance {spec.get('guidance')}"
    if row.kind == "latents" and spec:
        size, selection = spec.get("size", {}), spec.get("selection", {})
        return f"{selection.get('frames')} frames, {size.get('width')}x{size.get('height')}"
    if row.kind == "embeddings":
        return ", ".join(map(repr, spec.get("prompts", [])))
    return ""


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    from tavcli.ui import RichReporter

    with RichReporter().task(description, total) as advance:
        yield advance


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
    """Entry point: every mistake is one red line; user errors exit 1, command-line usage errors 2.

    File-system failures (permissions, a full disk) are the environment's, not bugs: one line too.
    Ctrl-C and SIGTERM stop with status 130 and a note that finished work is kept.
    """
    from tavcli.cores import choose_wait_policy

    choose_wait_policy()  # before torch loads: OpenMP reads it once
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = typer.main.get_command(app).main(prog_name="tav", standalone_mode=False)
    except typer.Abort:
        code = _fail(TavError("aborted"), 1)
    except Exception as error:
        if _parsing_error(error):  # an unknown option, a missing argument, a bad choice: click's, one line too
            return _usage(error)
        if _out_of_memory(error):
            error = TavError(
                "the device ran out of memory",
                "try --gradient-checkpointing, --precision bf16, fewer --frames or a smaller --width/--height; "
                "`tav tune --dry-run` estimates the peak",
            )
        if os.environ.get("TAV_DEBUG") or not isinstance(error, (TavError, OSError)):
            raise
        code = _fail(error, getattr(error, "exit_code", 1))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(code, int) and code:
        sys.exit(code)


def _parsing_error(error: Exception) -> bool:
    """Whether `error` is the command-line parser's (click's, or the copy of it newer typer ships)."""
    return type(error).__module__.split(".")[0] in ("click", "typer") and hasattr(error, "format_message")


def _usage(error: Any) -> None:
    """Report a parsing error as one line (help itself when no command was given) and exit with its status."""
    if type(error).__name__ == "NoArgsIsHelpError":
        error.show()
    else:
        hint = f"see `{error.ctx.command_path} --help`" if getattr(error, "ctx", None) else None
        _fail(TavError(error.format_message(), hint), error.exit_code)
    sys.exit(error.exit_code)


def _fail(error: TavError | OSError, code: int) -> int:
    """Print `error` as the one line a user sees and return the exit status."""
    from rich.console import Console

    message, hint = (error.message, error.hint) if isinstance(error, TavError) else (str(error), None)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    shown_hint = f" [dim]({escape(hint)})[/dim]" if hint else ""
    console.print(f"[bold red]error:[/bold red] {escape(message)}{shown_hint}")
    return code


def _out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted()
