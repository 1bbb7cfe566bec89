"""`tav edit`: plan an edit (its tune, inversion, null-text fit and control), then sample each group of prompts.

`plan_edit` resolves everything an edit needs before any sampling (what `tavcli.workflow.planning` names, made
when missing); `run_plan` samples what the store lacks (a whole UNet batch at a time) and hands each prompt to
`rendering` for its output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from tavcli.errors import TavError
from tavcli.files.reading import read_json
from tavcli.media.video import read_clip
from tavcli.method.attention_control import controlling
from tavcli.method.control import ControlGuide, canny_maps, load_controlnet, require_fits, require_opencv
from tavcli.method.sampling import ddim_sample
from tavcli.method.windows import windowed
from tavcli.models.lora import applied_loras
from tavcli.runtime import Runtime
from tavcli.settings.editing import EditRequest
from tavcli.settings.sampling import ControlSpec, EditSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.store.sidecar import RecordedEdit
from tavcli.store.specs import ClipFacts
from tavcli.workflow.attention import attention_steering
from tavcli.workflow.inversion import current_inversion, invert
from tavcli.workflow.keys import control_key, inversion_entry
from tavcli.workflow.null_text import fit_null_text
from tavcli.workflow.planning import edit_needs, inversion_needed
from tavcli.workflow.plans import EditPlan, guidance_of
from tavcli.workflow.remedies import overflow_causes
from tavcli.workflow.rendering import render_edit
from tavcli.workflow.session import (
    Artifact,
    Session,
    prompt_embeddings,
    recorded_frames,
    resolve_tune,
    size_time_ids,
    source_frames,
)

__all__ = [
    "edit",
    "edit_from_sidecar",
    "kept_steps",
    "kept_tune",
    "plan_edit",
    "run_plan",
]


def edit(session: Session, request: EditRequest, *, force: bool = False) -> list[Artifact]:
    """Render one clip per prompt from the inverted noise (inverting first if needed), each with a sidecar.

    Up to `request.batch_size` prompts are sampled together (one UNet batch), which keeps a GPU busy.
    """
    return run_plan(session, plan_edit(session, request), request, force=force)


def run_plan(
    session: Session, plan: EditPlan, request: EditRequest, *, force: bool = False, shown: list[str] | None = None
) -> list[Artifact]:
    """Sample what the store lacks of a planned edit, then render the `shown` prompts (default: all).

    The tune, inversion and latents stay in use throughout (`tav rm` refuses them), and each group's
    edits stay locked from sampling through rendering: a second process asking for the same edit waits,
    then finds the entries and the outputs made and reports them cached.

    For each group: 1. lock its edits; 2. sample it if the store lacks one of them; 3. render the shown
    prompts of it, with the sampling time shared among the prompts it computed.
    """
    wanted = shown if shown is not None else list(plan.entries)
    rendered: dict[str, Artifact] = {}
    with plan.project.using(_used(plan), "this edit"):
        for group in plan.groups:
            with _locked(plan.project, [plan.entries[prompt] for prompt in group], force):
                started = time.perf_counter()
                computed = _sample_group(session, plan, group, request.settings, force)
                share = (time.perf_counter() - started) / max(len(computed), 1)  # sampling time per computed prompt
                for prompt in (p for p in group if p in wanted):
                    rendered[prompt] = render_edit(session, plan, request, prompt, prompt not in computed, share)
    return [rendered[prompt] for prompt in wanted]


@contextmanager
def _locked(project: Project, members: list[Entry], force: bool) -> Iterator[None]:
    """A group's edit entries locked, in one order (so no deadlock). A project this user cannot write to may
    still render what it holds (to --out): there nothing is locked, as nothing can be written."""
    stored = not force and all(entry.complete for entry in members)
    with ExitStack() as locks:
        for entry in sorted(members, key=lambda e: e.key):
            locks.enter_context(project.lock(f"edits-{entry.key}", optional=stored))
        yield


def _used(plan: EditPlan) -> list[Entry]:
    """The entries an edit reads while it runs: its tune, its inversion and the edited frames' latents."""
    latents = plan.inversion.spec.get("latents") or plan.tune.spec["latents"]
    fitted = [plan.unconditional] if isinstance(plan.unconditional, Entry) and plan.unconditional.complete else []
    return [plan.tune, plan.inversion, plan.project.at("latents", latents), *fitted]


def plan_edit(session: Session, request: EditRequest, *, force_inversion: bool = False) -> EditPlan:
    """Resolve the project, tune and inversion (inverting now if needed), the null-text fit (fitting it now if an
    edit is to be sampled) and the control, before any sampling: the entries `tavcli.workflow.planning` names."""
    project, tune_entry = resolve_tune(session, request.project, request.tune_key)
    if request.tune_step is not None:
        tune_entry = kept_tune(project, tune_entry, request.tune_step)
    needed = inversion_needed(project, tune_entry, request)
    request.attention.check_source(needed.prompt)  # before any model loads (no words: nothing to check)
    controlnet = _controlnet(
        session, request.control, tune_entry
    )  # before any inversion: what is missing fails at once
    inverted = None
    if needed.current:
        inversion = current_inversion(session, project, tune_entry, needed.steps)
    else:
        inverted = invert(
            session, request.project, steps=needed.steps, prompt=needed.prompt, force=force_inversion,
            tune_key=tune_entry.key, frames=request.frames,
        )  # fmt: skip
        inversion = project.find("inversions", inverted.key)
    needs = edit_needs(project, inversion.key, request, session.runtime)
    latents = project.find("latents", inversion.spec.get("latents") or tune_entry.spec["latents"])
    clip = latents.meta()["clip"]
    guide = _guide(session, latents, clip, request.control, controlnet)
    if needs.null_text is not None and needs.samples:  # else nothing samples
        fit_null_text(
            session, project, tune=tune_entry, inversion=inversion, settings=request.settings,
            choice=request.inversion,
        )  # fmt: skip
    negative_prompt = needed.prompt if request.inversion.inversion == "negative-prompt" else None
    return EditPlan(
        project, tune_entry, inversion, clip, needs.edits, request.groups, guide, request.loras,
        needs.null_text or negative_prompt, request.attention, guidance_of(request.settings), inverted,
    )  # fmt: skip


def kept_tune(project: Project, tune_entry: Entry, step: int) -> Entry:
    """The state `tune_entry`'s run kept at `step` (a tune of `step` steps, as `tav tune --steps` makes it)."""
    if step == tune_entry.spec["steps"]:
        return tune_entry
    entry = project.entry("tunes", {**tune_entry.spec, "steps": step})
    if not entry.complete:
        kept = ", ".join(map(str, kept_steps(project, tune_entry.spec))) or "none"
        raise TavError(
            f"the tune kept no state at step {step} (kept: {kept})",
            f"tav tune --preview PROMPT --preview-every N keeps states; or tune again with --steps {step}",
        )
    return entry


def kept_steps(project: Project, spec: dict[str, Any]) -> list[int]:
    """The step counts the store holds a tune of, for the run of tune `spec` (its kept states and itself)."""

    def others(spec: dict[str, Any]) -> dict[str, Any]:
        return {field: value for field, value in spec.items() if field != "steps"}

    found = (project.find("tunes", key).spec for key in project.complete_keys("tunes"))
    return sorted(s["steps"] for s in found if others(s) == others(spec))


def _sample_group(session: Session, plan: EditPlan, group: list[str], settings: EditSettings, force: bool) -> set[str]:
    """Sample a group (locked by the caller) if the store lacks one of its edits (the whole group: its batch
    decides the numbers); return the prompts whose entries were written.

    1. Nothing to do when the store has every edit of the group (made before, or by the process waited for).
    2. The tuned UNet and the inverted noise, one copy per prompt.
    3. With the edit-time LoRAs applied: each prompt's embedding beside the unconditional one (the negative
       prompt's, the source prompt's for negative-prompt inversion, or null-text's per step), then DDIM
       sampling of the whole group as one UNet batch, under the run's autocast and any attention control.
    4. Each edit the store lacks saved, in float32.
    """
    runtime, project = session.runtime, plan.project
    members = [plan.entries[prompt] for prompt in group]
    if not force and all(entry.complete for entry in members):  # 1
        return set()
    components, unet = session.tuned_unet(project, plan.tune)  # 2
    trajectory = plan.inversion.tensors()["trajectory"]  # on the host: attention control moves a step's at a time
    noise = trajectory[-1].to(runtime.device).expand(len(group), *trajectory.shape[2:])
    label = group[0] if len(group) == 1 else f"{len(group)} prompts"
    loras = members[0].spec.get("loras")  # their identity in the edits' keys
    negative = plan.unconditional if isinstance(plan.unconditional, str) else settings.negative
    with applied_loras(components, unet, plan.loras):  # 3
        embeds = [prompt_embeddings(session, project, components.source, [p, negative], loras) for p in group]
        prompts = torch.cat([e[:1] for e in embeds])
        unconditional: torch.Tensor | list[torch.Tensor] = torch.cat([e[1:] for e in embeds])
        if isinstance(plan.unconditional, Entry):  # null-text: one embedding per step, for every prompt
            unconditional = list(plan.unconditional.tensors(runtime.device)["embeddings"].to(prompts.dtype))
        call = windowed(unet, plan.inversion.spec.get("window"))
        with ExitStack() as controlled:
            steering = None
            if plan.attention.active:  # its processors on the UNet for this group only
                control, steering = attention_steering(
                    session, plan, group, settings, components, call, loras, trajectory, unconditional
                )
                controlled.enter_context(controlling(unet, control))
            with session.reporter.task(f"editing: {label}", settings.steps) as advance, runtime.autocast():
                latents = ddim_sample(
                    call,
                    components.scheduler,
                    noise,
                    prompt_embeds=prompts,
                    negative_prompt_embeds=unconditional,
                    num_steps=settings.steps,
                    guidance=plan.guidance,
                    eta=settings.eta,
                    generator=runtime.generator(settings.seed),
                    on_step=lambda *_: advance(),
                    control=plan.guide,
                    steering=steering,
                )

    computed = set()
    for prompt, entry, sample in zip(group, members, latents.split(1), strict=True):  # 4
        if force or not entry.complete:
            facts = {"batch": group, "device": runtime.device.type}
            entry.save({"latents": sample.float()}, facts, causes=overflow_causes(runtime.precision, plan.loras))
            computed.add(prompt)
    return computed


def _controlnet(session: Session, control: ControlSpec | None, tune: Entry) -> Any:
    """The control's model, loaded and checked against the tune's base model, and OpenCV checked where canny maps
    of the source are needed."""
    if control is None:
        return None
    controlnet = load_controlnet(control.model, session.runtime.device, session.runtime.dtype)
    model = session.source(tune.meta()["model"]["model"])
    require_fits(controlnet, read_json(model.folder / "unet" / "config.json"), control.model)
    if control.video is None:
        require_opencv()
    return controlnet


def _guide(
    session: Session, latents: Entry, clip: ClipFacts, control: ControlSpec | None, controlnet: Any
) -> ControlGuide | None:
    """The ControlNet guide for the edited frames (`latents`, `clip`)."""
    if control is None:
        return None
    if control.video is not None:
        maps = read_clip(control.video, *recorded_frames(clip)).frames
    else:
        maps = canny_maps(source_frames(session, latents, clip))
    return ControlGuide(controlnet, maps, control.scale, size_time_ids(session, clip, controlnet))


def edit_from_sidecar(session: Session, recorded: RecordedEdit, *, force: bool = False) -> list[Artifact]:
    """Render an output again from its sidecar (`tavcli.store.sidecar.recorded_edit`): same project, tune,
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
    recorded.require_same_loras()
    # Refused before planning: planning inverts and fits null-text embeddings (minutes on a real model).
    _require_recorded_key(recorded, _recorded_key_now(session, recorded), session.runtime)
    plan = plan_edit(session, request)
    # A sidecar whose frames disagree with its recorded inversion (edited by hand) is only caught here.
    _require_recorded_key(recorded, plan.entries[recorded.prompt].key, session.runtime)
    # Its whole batch is sampled (the batch decides the numbers); only it is rendered.
    return run_plan(session, plan, request, force=force, shown=[recorded.prompt])


def _recorded_key_now(session: Session, recorded: RecordedEdit) -> str:
    """The key this session gives the recorded edit, from the sidecar's own record of its inversion and
    null-text fit with this session's precision and --compile: known before anything is computed."""
    request, runtime, project = recorded.request, session.runtime, Project(recorded.request.project)
    then = recorded.record["inversion"]  # its other frames and window, as `plan_edit` would choose them
    needed = inversion_needed(project, project.find("tunes", str(request.tune_key)), request)
    latents, window = then.get("latents"), then.get("window")
    inversion = inversion_entry(project, str(request.tune_key), needed.steps, needed.prompt, runtime, latents, window)
    return edit_needs(project, inversion.key, request, runtime).edits[recorded.prompt].key


def _require_recorded_key(recorded: RecordedEdit, key: str, runtime: Runtime) -> None:
    """Refuse to render anything but the edit the sidecar records: another precision or --compile makes another
    edit, and so do settings edited by hand (the sidecar no longer describes its own edit)."""
    if key == recorded.key:
        return
    if (runtime.precision, runtime.compile) != (recorded.precision, recorded.compiled):
        raise TavError(
            f"{recorded.sidecar} records edit {recorded.key}; with this precision and --compile it would be {key}",
            f"use the recorded ones: --precision {recorded.precision}{' --compile' if recorded.compiled else ''}",
        )
    raise TavError(
        f"{recorded.sidecar} records edit {recorded.key}, but its settings make edit {key}: it was changed by hand",
        "render from the sidecar as tav wrote it, or run `tav edit` with the settings you want",
    )
