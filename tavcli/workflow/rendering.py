"""Outputs: an edit's clip (its name, frame rate and reuse), grids and contact sheets, and their CLIP
scores written into the sidecars (`evaluate_output`, `score_edit`)."""

from __future__ import annotations

import hashlib
import re
import time
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tavcli import __version__
from tavcli.choices import OutputFormat
from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path
from tavcli.media.plots import loss_curve
from tavcli.media.video import (
    contact_sheet,
    read_frames,
    side_by_side,
    write_video,
)
from tavcli.method.vae import decode_latents
from tavcli.progress import Reporter
from tavcli.settings.editing import EditRequest
from tavcli.settings.options import EDIT, GIF_MAX_FPS
from tavcli.store.project import Project
from tavcli.store.sidecar import read_sidecar, sidecar_of, write_sidecar
from tavcli.store.specs import ClipFacts
from tavcli.workflow.plans import EditPlan
from tavcli.workflow.records import edit_record
from tavcli.workflow.session import Artifact, Session, resolve_tune, source_frames

if TYPE_CHECKING:  # metrics loads CLIP's image processing, which only --eval needs
    from tavcli.method.metrics import ClipScorer

__all__ = ["render_edit", "render_grid", "render_preview_sheet", "evaluate_output", "score_edit", "slug"]


def _output_rate(request: EditRequest, clip: ClipFacts, reporter: Reporter) -> Fraction | None:
    """The output's frame rate: --fps, else the tuned frames' rate (GIFs at most GIF_MAX_FPS); None for PNGs."""
    if request.format == "frames":
        return None  # PNG frames carry no rate
    rate = _rate(request.fps, Fraction(clip["fps"]), reporter)
    if request.fps is None and request.format == "gif" and rate > GIF_MAX_FPS:
        reporter.note(f"GIFs play at most {GIF_MAX_FPS:g} fps: writing {GIF_MAX_FPS:g} instead of {float(rate):.3g}")
        return Fraction(GIF_MAX_FPS)
    return rate


def _rate(fps: float | None, source: Fraction, reporter: Reporter) -> Fraction:
    """--fps as a fraction (denominator at most 1001, as containers store rates), else the source's rate, held
    to the range --fps accepts (a huge --stride derives rates no player plays and no container stores)."""
    if fps is not None:
        return Fraction(fps).limit_denominator(1001)
    declared = EDIT["fps"]
    low, high = Fraction(str(declared.low)), Fraction(str(declared.high))
    held = min(max(source, low), high)
    shown = f"{float(held):g} fps"
    if held != source:
        reporter.note(f"the tuned frames' rate {float(source):.3g} fps is outside --fps's range: writing {shown}")
    return held


def _output_path(
    folder: Path, prompt: str, key: str, fmt: OutputFormat, rate: Fraction | None, source: Fraction
) -> Path:
    """`PROMPT-SLUG-KEY.mp4`; a rate other than the source's is part of the name (`...-KEY-2fps.gif`)."""
    name = f"{slug(prompt)}-{key[:8]}"
    if rate is not None and rate != source:
        name += f"-{float(rate):.6g}fps"
    return folder / (name if fmt == "frames" else f"{name}.{fmt}")


def render_edit(
    session: Session, plan: EditPlan, request: EditRequest, prompt: str, cached: bool, sampling_seconds: float
) -> Artifact:
    """Write the edit's output and sidecar, unless an earlier run wrote this very output."""
    started = time.perf_counter()
    entry = plan.entries[prompt]
    rate = _output_rate(request, plan.clip, session.reporter)
    folder = request.out or plan.project.root / "renders"
    output = _output_path(folder, prompt, entry.key, request.format, rate, Fraction(plan.clip["fps"]))
    rendered = cached and _rendered(output, entry.key, request.format, rate)
    if not rendered:  # outputs are written atomically: a concurrent render of the same edit is harmless
        vae = session.model(plan.tune.meta()["model"]["model"]).vae
        frames = decode_latents(vae, entry.tensors(session.runtime.device)["latents"])
        write_video(frames, output, request.format, rate or Fraction(plan.clip["fps"]))
        write_sidecar(output, edit_record(session, plan, request, prompt, rate, frames.shape))
    seconds = time.perf_counter() - started + (0.0 if cached else sampling_seconds)
    details = {"prompt": prompt, "sidecar": str(sidecar_of(output)), "format": request.format}
    return Artifact("edit", entry.key, output, rendered, seconds, details)


def _rendered(output: Path, key: str, fmt: OutputFormat, rate: Fraction | None) -> bool:
    """Whether `output` exists and its sidecar says it is this edit, in this format, at this rate."""
    if not output.exists() or not sidecar_of(output).is_file():
        return False
    try:
        record = read_sidecar(sidecar_of(output))
        written = record["edit"]["key"], record["output"]["format"], record["output"]["fps"]
    except (TavError, KeyError, TypeError):
        return False
    return written == (key, fmt, None if rate is None else str(rate))


def render_grid(session: Session, project_root: Path, edits: list[Artifact], fps: float | None = None) -> Artifact:
    """The source clip and each edit side by side (mp4 and GIF, prompts as captions) and a PNG contact sheet,
    with a sidecar naming the edits it shows (so `tav rm` and `tav gc` find it)."""
    started = time.perf_counter()
    project, _ = resolve_tune(session, project_root, None)
    edited = project.find("inversions", project.find("edits", edits[0].key).spec["inversion"])
    tune_entry = project.find("tunes", edited.spec["tune"])  # a kept state's (--tune-step) too
    latents = project.find("latents", edited.spec.get("latents") or tune_entry.spec["latents"])
    clip = latents.meta()["clip"]
    source = source_frames(session, latents, clip)
    clips = [source, *(read_frames(edit.path) for edit in edits)]
    captions = [f"source: {tune_entry.spec['prompt']}", *(_grid_caption(project, edit) for edit in edits)]
    rate = _rate(fps, Fraction(clip["fps"]), session.reporter)
    key = hashlib.sha256(":".join([*(edit.key for edit in edits), str(rate)]).encode()).hexdigest()[:8]
    folder = edits[0].path.parent
    grid = side_by_side(clips, captions)
    video = write_video(grid, folder / f"grid-{key}.mp4", "mp4", rate)
    gif = write_video(grid, folder / f"grid-{key}.gif", "gif", rate)
    sheet = folder / f"grid-{key}-sheet.png"
    with atomic_path(sheet) as temp:
        contact_sheet(clips, captions).save(temp, format="PNG")
    files = [gif.name, sheet.name]
    grid_record = {"key": key, "edits": [edit.key for edit in edits], "prompts": captions[1:], "fps": str(rate)}
    write_sidecar(video, {"tav_version": __version__, "grid": {**grid_record, "files": files}})
    details = {"gif": str(gif), "sheet": str(sheet), "prompts": captions[1:]}
    return Artifact("grid", key, video, False, time.perf_counter() - started, details)


def _grid_caption(project: Project, edit: Artifact) -> str:
    """An edit's prompt, marked when attention control made it (a grid may show it beside the plain edit)."""
    controlled = project.find("edits", edit.key).spec.get("attention")
    return f"{edit.details['prompt']}{' (attention control)' if controlled else ''}"


PREVIEW_FRAMES = 8  # frames per row of a preview sheet: enough to see the motion, small enough to see the rows


def render_preview_sheet(session: Session, project_root: Path, tuned: Artifact, previews: list[Artifact]) -> Artifact:
    """One PNG for choosing a step count: the tune's loss curve, the kept steps marked, above a row of frames of
    each preview (its step and CLIP scores as caption), with a sidecar naming the previews' edits."""
    started = time.perf_counter()
    project = session.project(project_root)
    tune_entry = project.find("tunes", tuned.key)
    losses = tune_entry.meta().get("losses") or [float("nan")]
    steps = [int(preview.details["step"]) for preview in previews]
    curve = loss_curve(losses, marks=steps, title=f"{tune_entry.spec['prompt']!r}, {len(losses)} steps")
    latents = project.find("latents", tune_entry.spec["latents"])
    source = source_frames(session, latents, latents.meta()["clip"])
    rows = [_evenly(clip, PREVIEW_FRAMES) for clip in (source, *(read_frames(p.path) for p in previews))]
    captions = [_preview_caption(preview) for preview in previews]
    sheet = contact_sheet(rows, [f"source: {tune_entry.spec['prompt']}", *captions])
    picture = Image.new("RGB", (max(curve.width, sheet.width), curve.height + sheet.height), "white")
    picture.paste(curve, (0, 0))
    picture.paste(sheet, (0, curve.height))
    shown = hashlib.sha256(":".join(p.key for p in previews).encode()).hexdigest()[:8]  # another prompt: another file
    output = project.root / "renders" / f"preview-{tuned.key[:8]}-{shown}.png"
    with atomic_path(output) as temp:
        picture.save(temp, format="PNG")
    record = {"key": tuned.key, "edits": [p.key for p in previews], "prompts": captions, "steps": steps, "files": []}
    write_sidecar(output, {"tav_version": __version__, "grid": record})
    details = {"steps": steps, "prompt": str(previews[0].details["prompt"])}
    return Artifact("preview", tuned.key, output, False, time.perf_counter() - started, details)


def evaluate_output(scorer: ClipScorer, output: Path, prompt: str | None = None) -> dict[str, object]:
    """Score one output against `prompt` (default: the prompt in its sidecar); store the scores in the sidecar."""
    record = read_sidecar(sidecar_of(output)) if sidecar_of(output).is_file() else {}
    prompt = prompt if prompt is not None else record.get("edit", {}).get("prompt")
    if not prompt:
        raise TavError(f"no prompt for {output}: it has no tav sidecar", "pass --prompt")
    scores = scorer.score(read_frames(output), prompt)
    result = {"path": str(output), "prompt": prompt, "clip_model": scorer.name, **scores.record()}
    if record:
        write_sidecar(output, {**record, "scores": {k: v for k, v in result.items() if k != "path"}})
    return result


def score_edit(scorer: ClipScorer, artifact: Artifact) -> None:
    """Score a rendered edit with CLIP (`tav eval`'s metrics, also written to its sidecar) into its record."""
    scores = evaluate_output(scorer, artifact.path)
    artifact.details["scores"] = {k: v for k, v in scores.items() if k not in ("path", "prompt")}


def _evenly(frames: np.ndarray, most: int) -> np.ndarray:
    """At most `most` frames, evenly spread from the first to the last."""
    chosen: np.ndarray = frames[np.linspace(0, len(frames) - 1, min(most, len(frames))).round().astype(int)]
    return chosen


def _preview_caption(preview: Artifact) -> str:
    scores = preview.details.get("scores") or {}
    shown = f" | text {scores['text_faithfulness']:.3f} | frames {scores['frame_consistency']:.3f}" if scores else ""
    return f"step {preview.details['step']}{shown}"


def slug(text: str, limit: int = 48) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:limit].rstrip("-") or "edit"
