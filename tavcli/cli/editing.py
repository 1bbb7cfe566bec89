"""`tav invert`, `tav edit` and `tav eval`: commands that render a tuned clip and score the outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from tavcli.choices import OutputFormat
from tavcli.cli import output, setup
from tavcli.cli.options import (
    ATTENTION,
    CONTROL,
    DEFAULT_CLIP_MODEL,
    FRAMES,
    INVERSION,
    OUTPUT,
    RUN,
    SAMPLING,
    AllowPickleOpt,
    ClipModelOpt,
    CompileOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    PrecisionOpt,
    ProjectOpt,
    QuietOpt,
    declared,
    guidance_flags,
    settings_flags,
)
from tavcli.errors import TavError
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.declared import FLAGS
from tavcli.settings.editing import EditRequest, FrameChoice
from tavcli.settings.option import OptionError
from tavcli.settings.options import EDIT, INVERT, SELECTION
from tavcli.settings.sampling import EditSettings, InversionSettings, control_spec

__all__ = ["edit", "evaluate_outputs", "invert"]


@guidance_flags("guidance", INVERSION)
@settings_flags("chosen_frames", SELECTION, FRAMES)
@settings_flags("inversion", INVERT, INVERSION)
def invert(
    project: ProjectOpt = None,
    steps: Annotated[int, declared(INVERT["steps"])] = INVERT["steps"].default,
    prompt: Annotated[str, declared(INVERT["prompt"])] = INVERT["prompt"].default,
    inversion: InversionSettings = InversionSettings(),  # noqa: B008 (one flag per field: settings_flags)
    guidance: dict[str, float] = {},  # noqa: B006 (the guidance flags given, by name: guidance_flags)
    chosen_frames: FrameChoice = FrameChoice(),  # noqa: B008 (one flag per field: settings_flags)
    compile_unet: CompileOpt = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """DDIM-invert the tuned clip into the noise that edits start from.

    `tav edit` runs this itself when the project has no inversion yet; run it to choose the steps
    or the inversion prompt. The new inversion becomes the one `tav edit` uses.

    Examples:

      tav invert -p skiing.tav --steps 50

      tav invert -p skiing.tav --prompt "a man is skiing"

      tav invert -p skiing.tav --frames all --stride 1 --window 24

      tav invert -p skiing.tav --inversion null-text --guidance 7.5
    """
    if inversion.inversion != "null-text" and guidance:
        raise OptionError(f"{EDIT[next(iter(guidance))].flag} is what --inversion null-text fits at: give it too")
    sampling = EditSettings.named({"steps": steps, **guidance})
    inversion.check(sampling, None, FLAGS)
    project_dir = setup.existing_project(project)
    chosen = setup.settings(project_dir, device=device, precision=precision)
    session = setup.session(chosen, allow_pickle, compile_unet)
    from tavcli.workflow.inversion import invert_for_edits

    made = invert_for_edits(
        session, project_dir, inversion=inversion, steps=steps, prompt=prompt, settings=sampling, force=force,
        frames=chosen_frames,
    )  # fmt: skip
    output.report(made)


@settings_flags("attention", EDIT, ATTENTION)
@settings_flags("chosen_frames", SELECTION, FRAMES)
@settings_flags("inversion", INVERT, INVERSION)
@settings_flags("settings", EDIT, SAMPLING)
def edit(
    prompts: Annotated[
        Optional[list[str]],
        typer.Argument(help="One or more edited descriptions; one clip each.", metavar="PROMPT", show_default=False),
    ] = None,
    project: ProjectOpt = None,
    settings: EditSettings = EditSettings(),  # noqa: B008 (one flag per field: settings_flags)
    inversion: InversionSettings = InversionSettings(),  # noqa: B008 (one flag per field: settings_flags)
    attention: AttentionSettings = AttentionSettings(),  # noqa: B008 (one flag per field: settings_flags)
    fmt: Annotated[OutputFormat, declared(EDIT["format"], OUTPUT, short="-f")] = EDIT["format"].default,
    fps: Annotated[Optional[float], declared(EDIT["fps"], OUTPUT)] = EDIT["fps"].default,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="Output folder [default: PROJECT/renders].",
            rich_help_panel=OUTPUT,
            show_default=False,
        ),
    ] = None,
    chosen_frames: FrameChoice = FrameChoice(),  # noqa: B008 (one flag per field: settings_flags)
    tune_step: Annotated[Optional[int], declared(EDIT["tune_step"], SAMPLING)] = EDIT["tune_step"].default,
    lora: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Apply a LoRA (.safetensors file or folder) on top of the tuned model for this edit only: "
            "PATH or PATH:SCALE; repeatable. The tune and its inversion are reused.",
            metavar="PATH[:SCALE]",
            rich_help_panel=SAMPLING,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, declared(EDIT["batch_size"], RUN)] = EDIT["batch_size"].default,
    compile_unet: CompileOpt = False,
    control: Annotated[
        Optional[str],
        typer.Option(
            metavar="KIND",
            help="Condition frames with a ControlNet: canny, depth, pose, seg, scribble, normal, lineart, softedge.",
            rich_help_panel=CONTROL,
            show_default=False,
        ),
    ] = None,
    control_model: Annotated[
        Optional[str],
        typer.Option(
            metavar="MODEL",
            help="The ControlNet or T2I-Adapter: hub id or local folder (needed with --control).",
            rich_help_panel=CONTROL,
        ),
    ] = None,
    control_video: Annotated[
        Optional[Path],
        typer.Option(
            metavar="PATH",
            help="A clip of condition maps (e.g. poses), sampled like the source [default: for canny, made from it].",
            rich_help_panel=CONTROL,
            show_default=False,
        ),
    ] = None,
    control_scale: Annotated[float, declared(EDIT["control_scale"], CONTROL)] = EDIT["control_scale"].default,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid",
            help="Also write source | edits side by side (mp4, GIF) and a PNG contact sheet; with attention "
            "control, each prompt's plain edit beside its controlled one.",
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
            metavar="PATH",
            help="Render an output again from its JSON sidecar (its project, tune and settings).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Render the tuned clip with new prompts, one output (and a JSON sidecar) per prompt.

    Starts from the project's DDIM inversion, inverting first with --steps if there is none.
    Outputs are named PROMPT-KEY.mp4 (with the rate when --fps differs from the source's); a
    rerun reuses every output whose edit, format and rate are unchanged.

    Examples:

      tav edit -p skiing.tav "a panda is skiing" "a man is skiing at sunset"

      tav edit -p skiing.tav "a panda is skiing" --format gif --fps 8 --guidance 7.5

      tav edit -p skiing.tav "a panda is skiing" --frames all --stride 1 --window 24

      tav edit -p skiing.tav "a panda is skiing" --lora watercolor.safetensors:0.8 --tune-step 300

      tav edit --from-sidecar skiing.tav/renders/a-panda-is-skiing-0be3c4a3.mp4.json
    """
    if from_sidecar is not None:
        if prompts:
            raise TavError("give prompts or --from-sidecar, not both")
        from tavcli.store.sidecar import recorded_edit

        recorded = recorded_edit(from_sidecar, out)  # checked before anything heavy loads
        chosen = setup.settings(recorded.request.project, device=device, precision=precision or recorded.precision)
        session = setup.session(chosen, allow_pickle, compile_unet or recorded.compiled)
        from tavcli.workflow.editing import edit_from_sidecar

        output.report(edit_from_sidecar(session, recorded, force=force))
        return
    from tavcli.models.names import lora_path

    request = EditRequest(
        project=setup.existing_project(project),
        prompts=prompts or [],
        settings=settings,
        out=out,
        format=fmt,
        fps=fps,
        batch_size=batch_size,
        control=control_spec(control, control_model, control_video, control_scale),
        frames=chosen_frames,
        tune_step=tune_step,
        inversion=inversion,
        attention=attention,
        loras=tuple(map(lora_path, lora or [])),
    )
    from tavcli.workflow.source_prompt import check_source_words

    check_source_words(request)  # before torch is imported: in well under a second
    chosen = setup.settings(request.project, device=device, precision=precision)
    session = setup.session(chosen, allow_pickle, compile_unet)
    from tavcli.workflow.editing import edit as run_edit

    scorer = None
    if evaluate:  # loaded first, on the CPU: a CLIP model that cannot be had fails before any sampling
        import torch

        from tavcli.method.metrics import ClipScorer

        scorer = ClipScorer(clip_model, torch.device("cpu"))
    artifacts = run_edit(session, request, force=force)
    if scorer is not None:
        from tavcli.workflow.rendering import score_edit

        scorer.to(session.runtime.device)
        for artifact in artifacts:
            score_edit(scorer, artifact)
    if grid:
        from tavcli.workflow.rendering import render_grid

        shown = artifacts
        if attention.active:  # each prompt's plain edit beside its controlled one
            plain = run_edit(session, replace(request, attention=AttentionSettings()), force=force)
            shown = [edit for pair in zip(plain, artifacts, strict=True) for edit in pair]
            artifacts = shown
        artifacts.append(render_grid(session, request.project, shown, fps))
    output.report(artifacts)


def evaluate_outputs(
    outputs: Annotated[
        list[Path],
        typer.Argument(help="Rendered outputs: mp4/gif files or frames folders.", metavar="OUTPUT", show_default=False),
    ],
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt",
            help="Prompt to score against (needed without a tav sidecar) [default: each output's sidecar prompt].",
            metavar="PROMPT",
            show_default=False,
        ),
    ] = None,
    clip_model: ClipModelOpt = DEFAULT_CLIP_MODEL,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score outputs with CLIP: frame consistency and text faithfulness (the paper's metrics).

    Frame consistency is the mean cosine similarity of the CLIP image embeddings of all pairs of
    frames; text faithfulness the mean cosine similarity of each frame with the prompt. The scores
    are also written into each output's sidecar.

    Example: tav eval tav-demo.tav/renders/*.mp4 --clip-model ./clip-vit-large-patch14
    """
    from tavcli.settings.inputs import require_regular_file

    for path in outputs:
        if not path.is_dir():
            require_regular_file(path, "video file")
    from tavcli.method.metrics import ClipScorer
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.rendering import evaluate_output

    chosen = setup.settings(None, device=device)
    scorer = ClipScorer(clip_model, resolve_runtime(chosen["device"].value or "auto").device)
    results = []
    with output.progress("scoring", len(outputs)) as advance:
        for path in outputs:
            results.append(evaluate_output(scorer, path, prompt))
            advance()
    if output.records_wanted(as_json):
        for result in results:
            output.print_record(result)
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"CLIP: {escape(clip_model)}", title_justify="left")
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
    output.show(table)
