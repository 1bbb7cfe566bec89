"""`tav tune`, `tav import` and `tav demo`: commands that make a project's tune."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tavcli.cli import output, setup
from tavcli.cli.options import (
    DEFAULT_CLIP_MODEL,
    FRAMES,
    MODEL,
    PREVIEW,
    RUN,
    STORE,
    TRAINING,
    AllowPickleOpt,
    ClipModelOpt,
    ClipProjectOpt,
    CompileOpt,
    DeviceOpt,
    ForceOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    RevisionOpt,
    VaeOpt,
    VariantOpt,
    declared,
    settings_flags,
)
from tavcli.errors import TavError
from tavcli.settings.config import project_for_clip
from tavcli.settings.option import Option
from tavcli.settings.options import TUNE
from tavcli.settings.tuning import FrameSelection, FrameSize, TuneRequest, TuneSettings, preview_choice

__all__ = ["demo", "import_reference", "tune"]


# The panels of the tune settings that are not about training.
TUNE_PANELS = {"gradient_checkpointing": RUN, "checkpoint_every": STORE, "save_precision": STORE, "frame_norm": MODEL}


def _shown_default(name: str) -> str:
    """A tune option's help with its default, for a flag whose parameter is None when not given."""
    return f"{TUNE[name].help} [default: {TUNE[name].default}]"


@settings_flags("size", TUNE, FRAMES)
@settings_flags("selection", TUNE, FRAMES)
@settings_flags("settings", TUNE, TRAINING, panels=TUNE_PANELS)
def tune(
    context: typer.Context,
    video: Annotated[
        Path, typer.Argument(help="The clip: mp4, mov, webm, mkv or gif.", metavar="VIDEO", show_default=False)
    ],
    prompt: Annotated[
        str, typer.Argument(help='What the clip shows, e.g. "a man is skiing".', metavar="PROMPT", show_default=False)
    ],
    project: ClipProjectOpt = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    vae: VaeOpt = None,
    lora: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Fuse a LoRA (.safetensors file or folder) into the base model first: PATH or PATH:SCALE; repeatable.",
            metavar="PATH[:SCALE]",
            rich_help_panel=MODEL,
            show_default=False,
        ),
    ] = None,
    selection: FrameSelection = FrameSelection(),  # noqa: B008 (one flag per field: settings_flags)
    size: FrameSize = FrameSize(),  # noqa: B008
    settings: TuneSettings = TuneSettings(),  # noqa: B008
    # None: not given, so that one given without --preview is refused rather than ignored
    preview: Annotated[Optional[str], declared(TUNE["preview"], PREVIEW, metavar="PROMPT")] = None,
    preview_every: Annotated[
        Optional[int], declared(TUNE["preview_every"], PREVIEW, help=_shown_default("preview_every"))
    ] = None,
    preview_steps: Annotated[
        Optional[int], declared(TUNE["preview_steps"], PREVIEW, help=_shown_default("preview_steps"))
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option("--eval", help="Score each preview with CLIP (see tav eval).", rich_help_panel=PREVIEW),
    ] = False,
    clip_model: ClipModelOpt = DEFAULT_CLIP_MODEL,
    compile_unet: CompileOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what is cached and the estimated peak memory; train nothing.")
    ] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tune the model on one clip and its description (the reference's defaults).

    The clip is VAE-encoded once; only the attention query projections and the new temporal
    attention are trained, and only those tensors are saved in the project. Ctrl-C saves the
    training state: the same command resumes it, and a larger --steps continues a finished tune.

    Examples:

      tav tune skiing.mp4 "a man is skiing"

      tav tune skiing.mp4 "a man is skiing" --steps 300 --frames 16 --model ./my-sd-folder

      tav tune skiing.mp4 "a man is skiing" --preview "a panda is skiing" --preview-every 100 --eval

      tav tune skiing.mp4 "a man is skiing" --rank 16
    """
    from tavcli.media.video import probe

    previewed = preview_choice(preview, preview_every, preview_steps, evaluate)  # the rule batch files follow

    project_dir = project_for_clip(project, setup.settings(None))(video)
    chosen = setup.settings(project_dir, model=model, model_config=model_config, device=device, precision=precision)
    request = TuneRequest(
        clip=video,
        prompt=prompt,
        project=project_dir,
        model=setup.model_for(chosen, lora or [], revision, variant, vae),
        selection=selection,
        size=size.snapped(output.RichReporter()),
        settings=settings,
    )
    given = _given(context, TUNE)
    # A bad clip, or one too short for the frames asked for, is reported before anything heavy loads; the frame
    # count may still be the model's own (checked once the model is known).
    probe(video, request.selection if "frames" in given else None)
    session = setup.session(chosen, allow_pickle, compile_unet)
    from tavcli.workflow.tune_planning import tune_plan, with_model_defaults

    request = with_model_defaults(session, request, given=given)
    if dry_run:
        plan = tune_plan(session, request, force=force)
        output.print_record(plan)
        state = "cached" if plan["tune"]["cached"] else f"to train (from step {plan['tune']['resume_from'] or 0})"
        output.show(f"tune {plan['tune']['key']}: {state}\nmemory: {plan['memory']['summary']}")
        output.show(_fits_table(plan["memory"]["frames_that_fit"], request.size.width, request.size.height))
        return
    from tavcli.workflow.tuning import tune as run_tune

    scorer = None
    if evaluate:
        import torch

        from tavcli.method.metrics import ClipScorer

        scorer = ClipScorer(clip_model, torch.device("cpu"))  # on the device only while scoring
    from tavcli.method.training import TuneInterrupted
    from tavcli.workflow.session import Artifact

    try:
        artifacts = run_tune(session, request, force=force, preview=previewed, scorer=scorer)
    except TuneInterrupted as stopped:
        output.report([made for made in stopped.made if isinstance(made, Artifact)])  # kept states, previews
        raise
    output.report(artifacts)
    tuned = next(artifact for artifact in reversed(artifacts) if artifact.kind == "tune").details
    delta, unet = tuned["delta_bytes"], tuned["base_unet_bytes"]
    output.show(f"delta {delta / 1e6:.2f} MB, {_against(delta, unet)}")


def _given(context: typer.Context, options: dict[str, Option]) -> set[str]:
    """The options of `options` set on this command line (by name), not left at their defaults."""

    def given(option: Option) -> bool:
        source = context.get_parameter_source(option.attribute)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {name for name, option in options.items() if given(option)}


def _against(delta: int, unet: int) -> str:
    """How the delta's size compares with the UNet's (a high --rank can make it the larger)."""
    ratio = max(delta, unet) / max(min(delta, unet), 1)
    times = f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"
    return f"{times} {'smaller' if delta <= unet else 'larger'} than the UNet"


def import_reference(
    folder: Annotated[
        Path,
        typer.Argument(help="Output folder of the reference Tune-A-Video training script.", metavar="FOLDER"),
    ],
    clip: Annotated[
        Optional[Path],
        typer.Option(help="The tuned clip [default: train_data.video_path].", metavar="PATH", show_default=False),
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt", help="Its description [default: train_data.prompt].", metavar="PROMPT", show_default=False
        ),
    ] = None,
    project: ClipProjectOpt = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    frames: Annotated[Optional[int], declared(TUNE["frames"], help="[default: n_sample_frames, else 24]")] = None,
    stride: Annotated[Optional[int], declared(TUNE["stride"], help="[default: sample_frame_rate, else 2]")] = None,
    start: Annotated[Optional[int], declared(TUNE["start"], help="[default: sample_start_idx, else 0]")] = None,
    width: Annotated[Optional[int], declared(TUNE["width"], help="[default: width, else 512]")] = None,
    height: Annotated[Optional[int], declared(TUNE["height"], help="[default: height, else 512]")] = None,
    device: DeviceOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Import a model folder saved by the reference Tune-A-Video script as a tune, so its work is kept.

    Reads unet/ (the full video UNet) and config.yaml (clip, prompt, frames, size, steps), checks
    that the frozen weights are the base model's, stores only the tuned tensors, and makes the
    tune the project's current one: then `tav edit` works as after `tav tune`.

    Example: tav import outputs/man-skiing --model ./stable-diffusion-v1-4
    """
    from tavcli.media.video import probe
    from tavcli.method.reference import read_reference

    recorded = read_reference(folder, allow_pickle).settings
    clip_path = clip or (folder / recorded["clip"] if recorded.get("clip") else None)
    if clip is None and clip_path is not None and not clip_path.exists():
        clip_path = Path(recorded["clip"])  # relative to where the reference ran, often the current folder
    text = prompt or recorded.get("prompt")
    if clip_path is None or not text:
        raise TavError("which clip and prompt was it tuned on? config.yaml does not say", "pass --clip and --prompt")
    project_dir = project_for_clip(project, setup.settings(None))(clip_path)
    base = model or recorded.get("base_model")
    chosen = setup.settings(project_dir, model=base, model_config=model_config, device=device)

    def given(value: Any, option: str, key: str | None = None) -> Any:
        """A flag, else the reference run's setting (`key`, default the option's name), else tav tune's default
        (a recorded 0, a seed or a start frame, is a setting)."""
        chosen = recorded.get(key or option) if value is None else value
        return TUNE[option].default if chosen is None else chosen

    request = TuneRequest(
        clip=clip_path,
        prompt=text,
        project=project_dir,
        model=setup.model_for(chosen, (), revision, variant),
        selection=FrameSelection(
            frames=given(frames, "frames"), stride=given(stride, "stride"), start=given(start, "start")
        ),
        size=FrameSize(width=given(width, "width"), height=given(height, "height"), resize="stretch").snapped(
            output.RichReporter()
        ),
        # The reference run's training settings, as its config.yaml records them (`learning_rate`).
        settings=TuneSettings.named(
            {name: given(None, name, TUNE[name].attribute) for name in ("steps", "lr", "seed")}
        ),
    )
    probe(clip_path, request.selection)
    session = setup.session(chosen, allow_pickle)
    from tavcli.workflow.importing import import_tune

    output.report(import_tune(session, request, folder=folder))


def demo(
    project: Annotated[
        Path, typer.Option("--project", "-p", metavar="PATH", help="Where to put the demo project.")
    ] = Path("tav-demo.tav"),
    steps: Annotated[int, declared(TUNE["steps"], help="Training steps.")] = 30,
    quiet: QuietOpt = False,
) -> None:
    """Tune the built-in tiny model on the bundled skiing clip and render two edits (offline, CPU).

    The tiny model has random weights: the demo shows the whole pipeline and its speed, not pretty
    pictures. It runs the same code as:

      tav tune CLIP "a man is skiing" --model tiny --frames 8 --width 128 --height 128 --steps 30 -p tav-demo.tav

      tav edit -p tav-demo.tav "a panda is skiing" "a man is skiing at sunset" --steps 20
    """
    from tavcli.settings.editing import EditRequest
    from tavcli.settings.sampling import EditSettings

    session = setup.session(setup.settings(None, model="tiny"), allow_pickle=False)
    from tavcli.workflow.editing import edit as run_edit
    from tavcli.workflow.tuning import tune as run_tune

    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        request = TuneRequest(
            clip=clip,
            prompt="a man is skiing",
            project=project,
            model="tiny",
            selection=FrameSelection(frames=8, stride=2),
            size=FrameSize(width=128, height=128),
            settings=TuneSettings(steps=steps),
        )
        artifacts = run_tune(session, request)
    prompts = ["a panda is skiing", "a man is skiing at sunset"]
    artifacts += run_edit(session, EditRequest(project=project, prompts=prompts, settings=EditSettings(steps=20)))
    output.report(artifacts)


def _fits_table(fits: dict[str, dict[str, int]], width: int, height: int) -> Any:
    """The most frames at this size that a tune fits on each card size (estimated; half = fp16 or bf16)."""
    from rich import box
    from rich.table import Table

    from tavcli.method.memory import MAX_FRAMES

    settings = list(next(iter(fits.values())))
    table = Table(title=f"frames that fit at {width}x{height} (estimated)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("card")
    for setting in settings:
        table.add_column(setting, justify="right")
    for card, frames in fits.items():
        table.add_row(card, *(f"{frames[s]}{'+' if frames[s] == MAX_FRAMES else ''}" for s in settings))
    return table
