"""`tav invert` and `tav edit`: resolve the project, tune and inversion, then sample each group of prompts.

`plan_edit` resolves everything an edit needs before any sampling; `edit` samples what the store
lacks (a whole UNet batch at a time) and hands each prompt to `rendering` for its output.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tavcli.control import ControlGuide, canny_maps, load_controlnet
from tavcli.entry import Entry
from tavcli.errors import TavError
from tavcli.inversion import ddim_inversion
from tavcli.options import (
    INVERT,
    check_fields,
)
from tavcli.requests import ControlSpec, EditRequest, EditSettings
from tavcli.sampling import ddim_sample
from tavcli.sidecar import RecordedEdit
from tavcli.store import Project
from tavcli.video import (
    FrameSelection,
    FrameSize,
    read_clip,
)
from tavcli.workflow.keys import (
    control_key,
    edit_entries,
    inversion_entry,
)
from tavcli.workflow.rendering import render_edit, source_frames
from tavcli.workflow.session import Artifact, Session, prompt_embeddings, resolve_tune

__all__ = ["EditPlan", "edit", "edit_from_sidecar", "invert", "plan_edit", "run_plan"]


def invert(
    session: Session,
    project_root: Path,
    steps: int = 50,
    prompt: str = "",
    force: bool = False,
    tune_key: str | None = None,
) -> Artifact:
    """DDIM-invert the clip's posterior-mean latents with a tune (default: the project's current one)."""
    check_fields(INVERT, {"steps": steps, "prompt": prompt}, "inversion")
    project, tune_entry = resolve_tune(session, project_root, tune_key)
    runtime = session.runtime
    entry = inversion_entry(project, tune_entry.key, steps, prompt, runtime)
    started = time.perf_counter()

    def compute() -> None:
        components, unet = session.tuned_unet(project, tune_entry)
        stats = project.find("latents", tune_entry.spec["latents"]).tensors(runtime.device)
        latents = stats["mean"] * components.vae.config.scaling_factor
        embeds = prompt_embeddings(session, project, components.source, [prompt])
        with session.reporter.task("inverting", steps) as advance, runtime.autocast():
            trajectory = ddim_inversion(unet, components.scheduler, latents, embeds, steps, lambda *_: advance())
        facts = {"seconds": time.perf_counter() - started, "device": runtime.device.type}
        entry.save({"trajectory": torch.stack(trajectory).float()}, facts)

    cached = project.produce(entry, compute, force)
    if tune_key is None:
        project.update_state(inversion=entry.key)
    return Artifact("inversion", entry.key, entry.path, cached, time.perf_counter() - started, {"steps": steps})


@dataclass
class EditPlan:
    """An edit request resolved against its project: the tune, the inversion, each prompt's entry."""

    project: Project
    tune: Entry
    inversion: Entry
    clip: dict[str, Any]  # the tuned frames' facts (path, fps, selection, size)
    entries: dict[str, Entry]  # by prompt
    groups: list[list[str]]
    guide: ControlGuide | None


def edit(session: Session, request: EditRequest, force: bool = False) -> list[Artifact]:
    """Render one clip per prompt from the inverted noise (inverting first if needed), each with a sidecar.

    Up to `request.batch_size` prompts are sampled together (one UNet batch), which keeps a GPU busy.
    """
    return run_plan(session, plan_edit(session, request), request, force)


def run_plan(
    session: Session, plan: EditPlan, request: EditRequest, force: bool = False, shown: list[str] | None = None
) -> list[Artifact]:
    """Sample what the store lacks of a planned edit, then render the `shown` prompts (default: all)."""
    started = time.perf_counter()
    computed = _sample_edits(session, plan, request.settings, force)
    share = (time.perf_counter() - started) / max(len(computed), 1)  # sampling time per computed prompt
    prompts = shown if shown is not None else list(plan.entries)
    return [render_edit(session, plan, request, prompt, prompt not in computed, share) for prompt in prompts]


def plan_edit(session: Session, request: EditRequest) -> EditPlan:
    """Resolve the project, tune and inversion (inverting now if needed) and the control, before any sampling."""
    project, tune_entry = resolve_tune(session, request.project, request.tune_key)
    steps = request.invert_steps or request.settings.steps
    if request.tune_key is None:
        inversion = _current_inversion(session, project, tune_entry, steps)
    else:
        artifact = invert(session, request.project, steps, request.invert_prompt, tune_key=request.tune_key)
        inversion = project.find("inversions", artifact.key)
    clip = project.find("latents", tune_entry.spec["latents"]).meta()["clip"]
    guide, control = _control(session, project, tune_entry, clip, request.control)
    entries = edit_entries(project, inversion.key, request, session.runtime, control)
    return EditPlan(project, tune_entry, inversion, clip, entries, request.groups, guide)


def _sample_edits(session: Session, plan: EditPlan, settings: EditSettings, force: bool) -> set[str]:
    """Sample every group with an edit the store lacks (the whole group: its batch decides the numbers);
    return the prompts whose entries were written."""
    runtime, project = session.runtime, plan.project
    computed: set[str] = set()
    for group in plan.groups:
        members = [plan.entries[prompt] for prompt in group]
        if not force and all(entry.complete for entry in members):
            continue
        with ExitStack() as locks:
            for entry in sorted(members, key=lambda e: e.key):  # one order: no deadlock
                locks.enter_context(project.lock(f"edits-{entry.key}"))
            if not force and all(entry.complete for entry in members):  # another process made them
                continue
            components, unet = session.tuned_unet(project, plan.tune)
            noise = plan.inversion.tensors(runtime.device)["trajectory"][-1]
            embeds = [prompt_embeddings(session, project, components.source, [p, settings.negative]) for p in group]
            generator = torch.Generator(runtime.device).manual_seed(settings.seed)
            label = group[0] if len(group) == 1 else f"{len(group)} prompts"
            with session.reporter.task(f"editing: {label}", settings.steps) as advance, runtime.autocast():
                latents = ddim_sample(
                    unet,
                    components.scheduler,
                    noise.expand(len(group), *noise.shape[1:]),
                    torch.cat([e[:1] for e in embeds]),
                    torch.cat([e[1:] for e in embeds]),
                    settings.steps,
                    settings.guidance,
                    eta=settings.eta,
                    generator=generator,
                    on_step=lambda *_: advance(),
                    control=plan.guide,
                )
            for prompt, entry, sample in zip(group, members, latents.split(1), strict=True):
                if force or not entry.complete:
                    entry.save({"latents": sample.float()}, {"batch": group, "device": runtime.device.type})
                    computed.add(prompt)
    return computed


def _control(
    session: Session, project: Project, tune_entry: Entry, clip: dict[str, Any], control: ControlSpec | None
) -> tuple[ControlGuide | None, dict[str, Any] | None]:
    """The ControlNet guide for this project's frames, and what identifies it in the edits' keys."""
    if control is None:
        return None, None
    selection = FrameSelection(frames=clip["frames"], stride=clip["stride"], start=clip["start"])
    size = FrameSize(clip["width"], clip["height"], clip["resize"])
    if control.video is not None:
        maps = read_clip(control.video, selection, size).frames
    else:
        latents = project.find("latents", tune_entry.spec["latents"])
        maps = canny_maps(source_frames(session, tune_entry, latents, clip))
    controlnet = load_controlnet(control.model, session.runtime.device, session.runtime.dtype)
    return ControlGuide(controlnet, maps, control.scale), control_key(control)


def edit_from_sidecar(session: Session, recorded: RecordedEdit, force: bool = False) -> list[Artifact]:
    """Render an output again from its sidecar (`tavcli.sidecar.recorded_edit`): same project, tune,
    inversion, settings and batch, after checking that its ControlNet and condition clip are unchanged
    and that this session computes the very edit recorded (its key: the same precision and --compile)."""
    request, sidecar = recorded.request, recorded.sidecar
    if not (request.project / "tunes" / str(request.tune_key) / "meta.json").is_file():
        raise TavError(
            f"project {request.project} no longer has tune {request.tune_key}",
            f"run the `reproduce` commands in {sidecar} to rebuild it",
        )
    if request.control is not None:
        now, then = control_key(request.control), recorded.record["edit"].get("control") or {}
        names = {
            "model": f"the ControlNet {request.control.model}",
            "maps": f"the condition clip {request.control.video}",
        }
        changed = [names[part] for part in names if now[part] != then[part]]
        if changed:
            raise TavError(
                f"{' and '.join(changed)} changed since {sidecar} was written",
                "edit again with --control to render the new one",
            )
    plan = plan_edit(session, request)
    key = plan.entries[recorded.prompt].key
    if key != recorded.key:
        raise TavError(
            f"{sidecar} records edit {recorded.key}; with this precision and --compile it would be {key}",
            f"use the recorded ones: --precision {recorded.precision}{' --compile' if recorded.compiled else ''}",
        )
    return run_plan(session, plan, request, force, [recorded.prompt])  # its batch is sampled, only it is rendered


def _current_inversion(session: Session, project: Project, tune_entry: Entry, steps: int) -> Entry:
    """The project's inversion for this tune, or a new one with `steps` DDIM steps."""
    key = project.state.get("inversion")
    if key and (project.root / "inversions" / key / "meta.json").is_file():
        entry = project.find("inversions", key)
        if entry.spec.get("tune") == tune_entry.key:
            return entry
    artifact = invert(session, project.root, steps=steps)
    return project.find("inversions", artifact.key)
