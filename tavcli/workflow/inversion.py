"""`tav invert`: a tune's DDIM inversion of the clip, on the tuned frames or others of the same clip, and the
inversion that edits of an `--inversion` choice start from (`invert_for_edits`).

Which inversion an edit needs is decided without computing anything by `tavcli.workflow.planning`; this module
computes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tavcli.errors import TavError
from tavcli.files.hashing import file_sha256
from tavcli.media.video import frame_count
from tavcli.method.inversion import ddim_inversion
from tavcli.method.windows import windowed
from tavcli.settings.editing import FrameChoice
from tavcli.settings.option import check_fields
from tavcli.settings.options import INVERT
from tavcli.settings.sampling import EditSettings, InversionSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.store.specs import ClipFacts
from tavcli.workflow.keys import inversion_entry, latents_entry
from tavcli.workflow.null_text import fit_null_text
from tavcli.workflow.planning import command_inversion
from tavcli.workflow.session import (
    Artifact,
    Session,
    encode_latents,
    prompt_embeddings,
    recorded_frames,
    resolve_tune,
)
from tavcli.workflow.source_prompt import stored_inversion

__all__ = ["ChosenFrames", "choose_frames", "current_inversion", "invert", "invert_for_edits"]


def invert(
    session: Session,
    project_root: Path,
    *,
    steps: int = INVERT["steps"].default,
    prompt: str = INVERT["prompt"].default,
    force: bool = False,
    tune_key: str | None = None,
    frames: FrameChoice | None = None,
) -> Artifact:
    """DDIM-invert the clip's posterior-mean latents with a tune (default: the project's current one, whose
    inversion this becomes), on the tuned frames or on `frames` (encoded first if the store lacks them)."""
    check_fields(INVERT, {"steps": steps, "prompt": prompt}, "inversion")
    project, tune_entry = resolve_tune(session, project_root, tune_key)
    runtime = session.runtime
    chosen = choose_frames(session, project, tune_entry, frames or FrameChoice())
    latents_key = None if chosen.latents.key == tune_entry.spec["latents"] else chosen.latents.key
    entry = inversion_entry(project, tune_entry.key, steps, prompt, runtime, latents_key, chosen.window)
    started = time.perf_counter()

    def compute() -> None:
        components, unet = session.tuned_unet(project, tune_entry)
        stats = chosen.latents.tensors(runtime.device)
        latents = stats["mean"] * components.vae.config.scaling_factor
        embeds = prompt_embeddings(session, project, components.source, [prompt])
        with session.reporter.task("inverting", steps) as advance, runtime.autocast():
            trajectory = ddim_inversion(
                windowed(unet, chosen.window), components.scheduler, latents, embeds, steps, lambda *_: advance()
            )
        facts = {"seconds": time.perf_counter() - started, "device": runtime.device.type}
        entry.save({"trajectory": torch.stack(trajectory).float()}, facts)

    with project.using([chosen.latents], "this inversion"):  # its tune is held by `produce`
        cached = project.produce(entry, compute, force)
    if tune_key is None:
        project.update_state(inversion=entry.key)
    details = {"steps": steps, "frames": chosen.count, **({"window": chosen.window} if chosen.window else {})}
    return Artifact("inversion", entry.key, entry.path, cached, time.perf_counter() - started, details)


def invert_for_edits(
    session: Session,
    project_root: Path,
    *,
    inversion: InversionSettings,
    steps: int = INVERT["steps"].default,
    prompt: str = INVERT["prompt"].default,
    settings: EditSettings | None = None,
    force: bool = False,
    frames: FrameChoice | None = None,
    tune_key: str | None = None,
) -> list[Artifact]:
    """`tav invert`: the inversion that edits of `inversion` start from, with a tune (default: the project's
    current one). A plain DDIM inversion of the current tune becomes the project's current one. Null-text and
    negative-prompt inversions invert with the tune's prompt (the one `tav edit --inversion` uses) and leave the
    current one as it is, so a plain `tav edit` stays the reference's; null-text also fits its embeddings at
    `settings`' guidance, so that edits at that guidance reuse them."""
    project, tune_entry = resolve_tune(session, project_root, tune_key)
    prompt = command_inversion(tune_entry, inversion, prompt)
    # A plain inversion of the current tune becomes the current one; the others are of their tune alone.
    own = tune_entry.key if inversion.reconstructs else tune_key
    inverted = invert(session, project_root, steps=steps, prompt=prompt, force=force, tune_key=own, frames=frames)
    if inversion.inversion != "null-text":
        return [inverted]
    inverted_entry = project.find("inversions", inverted.key)
    sampling = settings or EditSettings(steps=steps)
    fitted = fit_null_text(
        session, project, tune=tune_entry, inversion=inverted_entry, settings=sampling, choice=inversion, force=force
    )
    return [inverted, fitted]


@dataclass(frozen=True)
class ChosenFrames:
    """The frames an inversion works on: their latents entry, how many, and the window (None: all at once)."""

    latents: Entry
    count: int
    window: int | None


def choose_frames(session: Session, project: Project, tune_entry: Entry, choice: FrameChoice) -> ChosenFrames:
    """The tuned frames, or the selection `choice` makes of the same clip (its latents encoded if missing)."""
    tuned = project.find("latents", tune_entry.spec["latents"])
    clip = tuned.meta()["clip"]
    tuned_selection, size = recorded_frames(clip)
    path = None  # the clip file, read only when other frames need it

    def length() -> int:
        nonlocal path
        path = _tuned_clip(tuned, clip)
        return frame_count(path)

    selection = choice.selection(tuned_selection, length)  # the rule batch validation applies too
    frames = selection.frames
    window = choice.window if choice.window is not None and choice.window < frames else None
    if selection == tuned_selection:
        return ChosenFrames(tuned, frames, window)
    path = path or _tuned_clip(tuned, clip)
    source = session.source(tune_entry.meta()["model"]["model"])
    entry = latents_entry(project, source, tuned.spec["clip_sha256"], selection, size, session.runtime.precision)
    encode_latents(session, project, entry, source.name, path, selection, size)
    return ChosenFrames(entry, frames, window)


def _tuned_clip(tuned: Entry, clip: ClipFacts) -> Path:
    """The clip the project was tuned on, checked to be the very file (other frames are read from it)."""
    path = Path(clip["path"])
    if not path.is_file():
        raise TavError(f"the tuned clip {path} is gone: other frames than the tuned ones are read from it")
    if file_sha256(path) != tuned.spec["clip_sha256"]:
        raise TavError(f"{path} has changed since the project was tuned on it", "tune again on the new clip")
    return path


def current_inversion(session: Session, project: Project, tune_entry: Entry, steps: int) -> Entry:
    """The project's inversion for this tune, or a new one with `steps` DDIM steps (which becomes it)."""
    stored = stored_inversion(project, tune_entry)
    if stored is not None:
        return stored
    artifact = invert(session, project.root, steps=steps)
    return project.find("inversions", artifact.key)
