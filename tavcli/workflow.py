"""What `tav tune`, `tav invert` and `tav edit` do, as plain functions on a project directory.

Each step looks its result up in the project's store first and computes it only when missing.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tavcli import __version__
from tavcli.atomic import atomic_path
from tavcli.checkpoints import Checkpoints, load_train_state, train_state_bytes
from tavcli.control import ControlGuide, ControlSpec, canny_maps, controlnet_identity, load_controlnet
from tavcli.errors import TavError
from tavcli.hashing import file_sha256
from tavcli.inputs import require_folder, require_prompt
from tavcli.inversion import ddim_inversion
from tavcli.loading import Components, ModelSource, encode_prompts, load_components, resolve_model, weight_files
from tavcli.memory import MemoryEstimate, check_fits, probe_activations, tune_estimate
from tavcli.model_name import parse_model_name
from tavcli.options import (
    GIF_MAX_FPS,
    INVERT,
    FrameNorm,
    OutputFormat,
    check_fields,
)
from tavcli.progress import Reporter
from tavcli.requests import EditRequest, EditSettings, TuneRequest, TuneSettings, frame_size
from tavcli.runtime import Runtime
from tavcli.sampling import ddim_sample
from tavcli.sidecar import RecordedEdit, read_sidecar, sidecar_of, write_sidecar
from tavcli.store import TENSORS, Entry, Project
from tavcli.training import TrainState, stop_requests, train_delta
from tavcli.vae import decode_latents, encode_clip
from tavcli.video import (
    FrameSelection,
    FrameSize,
    contact_sheet,
    probe,
    read_clip,
    read_frames,
    side_by_side,
    write_video,
)
from tavcli.video_unet import VideoUNet, inflate_unet

__all__ = [
    "Artifact",
    "EditPlan",
    "EditRequest",
    "EditSettings",
    "Session",
    "TuneRequest",
    "edit",
    "edit_entries",
    "edit_entry",
    "edit_from_sidecar",
    "frame_size",
    "import_tune",
    "inversion_entry",
    "invert",
    "latents_entry",
    "plan_edit",
    "prompt_embeddings",
    "render_grid",
    "tune",
    "tune_memory",
    "tune_plan",
    "tune_run",
    "tune_spec",
]

CANNY_OF_SOURCE = "canny of the source clip"  # the maps' source in an edit key when tav computes them


@dataclass
class Artifact:
    """One result a command produced or found cached: the record printed on stdout."""

    kind: str
    key: str
    path: Path
    cached: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "path": str(self.path),
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            **self.details,
        }


class Session:
    """Models loaded in this process, shared by every command it runs."""

    def __init__(self, runtime: Runtime, reporter: Reporter | None = None, allow_pickle: bool = False) -> None:
        self.runtime = runtime
        self.reporter = reporter or Reporter()
        self.allow_pickle = allow_pickle
        self._sources: dict[str, ModelSource] = {}
        self._components: dict[str, Components] = {}  # by model revision
        self._tuned: dict[str, VideoUNet] = {}

    def project(self, root: Path) -> Project:
        """The project at `root`, telling this session's reporter when it waits for another process."""
        project = Project(root, on_wait=self.reporter.note)
        project.check_version()
        return project

    def source(self, name: str) -> ModelSource:
        """Where model `name` is (downloading it if needed), without loading it."""
        if name not in self._sources:
            self._sources[name] = resolve_model(name, self.allow_pickle, self.reporter.note)
        return self._sources[name]

    def model(self, name: str) -> Components:
        """Model `name`, loaded once, with every part on the device (moved back if it was offloaded)."""
        source = self.source(name)
        if source.revision not in self._components:
            self.reporter.note(f"loading model {source.name}")
            dtype = self.runtime.dtype
            self._components[source.revision] = load_components(source, self.runtime.device, dtype, self.allow_pickle)
        components = self._components[source.revision]
        for module in (components.vae, components.text_encoder):
            if module.device != self.runtime.device:
                module.to(self.runtime.device)
        return components

    def offload_frozen(self, name: str) -> None:
        """On a GPU, move the VAE and text encoder to the CPU while only the UNet works (tuning)."""
        if self.runtime.device.type != "cuda":
            return
        components = self.model(name)
        components.vae.to("cpu")
        components.text_encoder.to("cpu")
        torch.cuda.empty_cache()

    def release(self, name: str) -> None:
        """Free model `name` (and UNets tuned from it) once no more work needs it."""
        source = self._sources.get(name)
        if source is not None and self._components.pop(source.revision, None) is not None:
            self._tuned.clear()

    def forget_tuned(self, key: str) -> None:
        """Drop a tuned UNet built from an entry that was just recomputed."""
        self._tuned.pop(key, None)

    def tuned_unet(self, project: Project, tune_entry: Entry) -> tuple[Components, VideoUNet]:
        """The base model with `tune_entry`'s delta applied."""
        meta = tune_entry.meta()
        components = self.model(meta["model"]["model"])
        _check_same_model(components.source, meta["model"])
        if tune_entry.key not in self._tuned:
            unet = inflate_unet(components.unet, frame_norm=tune_entry.spec["frame_norm"])
            delta = tune_entry.tensors(self.runtime.device)
            result = unet.load_state_dict(delta, strict=False)
            if result.unexpected_keys:
                raise TavError(f"tuned delta {tune_entry.path} does not fit this model", "run `tav tune` again")
            self._tuned[tune_entry.key] = self.runtime.prepare(unet.eval())  # type: ignore[assignment]
        return components, self._tuned[tune_entry.key]


def latents_entry(
    project: Project, source: ModelSource, clip: Path, selection: FrameSelection, size: FrameSize, precision: str
) -> Entry:
    """The store entry of a clip's VAE posterior: per model, clip content, frames, size and VAE precision."""
    spec = {
        "model": source.identity,
        "clip_sha256": file_sha256(clip),
        "selection": asdict(selection),
        "size": asdict(size),
        **_unless_fp32(precision),
    }
    return project.entry("latents", spec)


def _unless_fp32(precision: str) -> dict[str, str]:
    """The precision in the keys of latents and inversions, which first recorded none: fp32 keys stay as they were."""
    return {} if precision == "fp32" else {"precision": precision}


def _compiled(compiled: bool) -> dict[str, bool]:
    """`--compile` in the keys of what the UNet computes: compiled kernels round differently."""
    return {"compile": True} if compiled else {}


def tune_spec(
    latents_key: str, prompt: str, settings: TuneSettings, precision: str, frame_norm: str, compiled: bool = False
) -> dict[str, Any]:
    """Everything that determines a tune (`tune_run` drops the steps to name its training run)."""
    return {
        "latents": latents_key,
        "prompt": prompt,
        "steps": settings.steps,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "precision": precision,
        "frame_norm": frame_norm,
        **_compiled(compiled),
    }


def tune_run(spec: dict[str, Any]) -> dict[str, Any]:
    """A tune's spec without its step count: what names the training run its checkpoints belong to."""
    return {k: v for k, v in spec.items() if k != "steps"}


def inversion_entry(project: Project, tune_key: str, steps: int, prompt: str, runtime: Runtime) -> Entry:
    spec = {"tune": tune_key, "steps": steps, "prompt": prompt, **_unless_fp32(runtime.precision)}
    return project.entry("inversions", {**spec, **_compiled(runtime.compile)})


def edit_entry(
    project: Project,
    inversion_key: str,
    prompt: str,
    settings: EditSettings,
    runtime: Runtime,
    control: dict[str, Any] | None = None,
    batch: int = 1,
) -> Entry:
    """An edit's entry. `batch` is how many prompts share its UNet batch: batched matrix products round
    differently, so a batched edit is another entry (absent for 1, like `control` when uncontrolled,
    so that keys of earlier edits stay valid)."""
    spec = {"inversion": inversion_key, "prompt": prompt, **asdict(settings), "precision": runtime.precision}
    if control is not None:
        spec["control"] = control
    if batch > 1:
        spec["batch"] = batch
    if settings.eta == 0:
        spec["seed"] = None  # deterministic DDIM draws no noise: the seed determines nothing
    return project.entry("edits", {**spec, **_compiled(runtime.compile)})


def tune(session: Session, request: TuneRequest, force: bool = False) -> list[Artifact]:
    """Encode the clip (once) and tune the model on it; make the tune the project's current one.

    Training resumes from the run's latest checkpoint at or below `settings.steps`, so an
    interrupted tune goes on where it stopped and a longer tune continues a shorter one.
    """
    prompt, settings, frame_norm = require_prompt(request.prompt), request.settings, request.frame_norm
    probe(request.clip, request.selection)  # a bad clip should fail before a slow model load
    require_folder(request.project, "--project")
    source = session.source(request.model)
    project = session.project(request.project)
    latents, latents_artifact = _clip_latents(
        session, source, project, request.clip, request.selection, request.size, force
    )
    spec = tune_spec(latents.key, prompt, settings, session.runtime.precision, frame_norm, session.runtime.compile)
    entry = project.entry("tunes", spec)
    run = tune_run(spec)
    checkpoints = Checkpoints.of_run(project.root, run)
    started = time.perf_counter()

    def compute() -> None:
        state = _train(session, source, project, latents, checkpoints, run, prompt, settings, frame_norm, force)
        facts = {
            "model": source.identity,
            "clip": latents.meta()["clip"],
            "losses": state.losses,
            "seconds": time.perf_counter() - started,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "device": session.runtime.device.type,
            "tav_version": __version__,
        }
        entry.save(state.params, facts)
        session.forget_tuned(entry.key)

    cached = project.produce(entry, compute, force, lock=f"checkpoints-{checkpoints.key}")
    if project.state.get("tune") != entry.key:
        project.update_state(tune=entry.key, inversion=None)
    delta_bytes = (entry.path / TENSORS).stat().st_size
    unet_files = {f for name in weight_files("unet", allow_pickle=True) for f in (source.folder / "unet").glob(name)}
    unet_bytes = sum(f.stat().st_size for f in unet_files)
    details = {"prompt": prompt, "steps": settings.steps, "delta_bytes": delta_bytes, "base_unet_bytes": unet_bytes}
    tuned = Artifact("tune", entry.key, entry.path, cached, time.perf_counter() - started, details)
    return [latents_artifact, tuned]


def tune_plan(session: Session, request: TuneRequest, force: bool = False, memory: bool = True) -> dict[str, Any]:
    """What `tune` would reuse and compute (and, with `memory`, its estimated peak memory), computing nothing.

    `resume_from` is the step of the checkpoint training would start from (None: from scratch).
    """
    settings, selection, size = request.settings, request.selection, request.size
    require_prompt(request.prompt)
    probe(request.clip, selection)
    source = session.source(request.model)
    project = session.project(request.project)
    latents = latents_entry(project, source, request.clip, selection, size, session.runtime.precision)
    runtime = session.runtime
    spec = tune_spec(latents.key, request.prompt, settings, runtime.precision, request.frame_norm, runtime.compile)
    entry = project.entry("tunes", spec)
    resume = Checkpoints.of_run(project.root, tune_run(spec)).latest_step(settings.steps)
    plan: dict[str, Any] = {
        "kind": "plan",
        "latents": {"key": latents.key, "path": str(latents.path), "cached": latents.complete and not force},
        "tune": {
            "key": entry.key,
            "path": str(entry.path),
            "cached": entry.complete and not force,
            "resume_from": None if force else resume,
        },
    }
    if not memory:
        return plan
    with torch.random.fork_rng(devices=[]):
        unet = inflate_unet(session.model(request.model).unet, frame_norm=request.frame_norm)
    precision = session.runtime.precision
    estimate = tune_memory(unet, selection.frames, size.height, size.width, settings.gradient_checkpointing, precision)
    return {
        **plan,
        "memory": {
            "peak_bytes": estimate.total,
            "weights_bytes": estimate.weights,
            "training_state_bytes": estimate.training_state,
            "activation_bytes": estimate.activations,
            "summary": estimate.describe(),
        },
    }


def import_tune(session: Session, folder: Path, request: TuneRequest) -> list[Artifact]:
    """Store the tuned tensors of a reference Tune-A-Video output folder as a tune of `request.clip`."""
    from tavcli.importing import extract_delta, read_reference

    prompt = require_prompt(request.prompt)
    probe(request.clip, request.selection)
    require_folder(request.project, "--project")
    run = read_reference(folder, session.allow_pickle)
    source = session.source(request.model)
    project = session.project(request.project)
    latents, latents_artifact = _clip_latents(
        session, source, project, request.clip, request.selection, request.size, force=False
    )
    spec = {
        **tune_spec(latents.key, prompt, request.settings, "fp32", "joint"),
        "imported": file_sha256(run.weights_file),
    }
    entry = project.entry("tunes", spec)
    started = time.perf_counter()

    def compute() -> None:
        unet = inflate_unet(session.model(request.model).unet)
        delta = extract_delta(run.weights, unet)
        facts = {"model": source.identity, "clip": latents.meta()["clip"], "imported_from": str(folder.resolve())}
        entry.save(delta, {**facts, "losses": [], "tav_version": __version__})

    cached = project.produce(entry, compute)
    project.update_state(tune=entry.key, inversion=None)
    details = {"prompt": prompt, "imported_from": str(folder), "delta_bytes": (entry.path / TENSORS).stat().st_size}
    return [latents_artifact, Artifact("tune", entry.key, entry.path, cached, time.perf_counter() - started, details)]


def _clip_latents(
    session: Session,
    source: ModelSource,
    project: Project,
    clip: Path,
    selection: FrameSelection,
    size: FrameSize,
    force: bool,
) -> tuple[Entry, Artifact]:
    """The clip's VAE posterior (mean, std), encoded once per model, clip content, frames and size."""
    started = time.perf_counter()
    entry = latents_entry(project, source, clip, selection, size, session.runtime.precision)

    def compute() -> None:
        frames = read_clip(clip, selection, size)
        vae = session.model(source.name).vae  # loaded before the progress bar starts
        with session.reporter.task("encoding clip", 1) as advance:
            mean, std = encode_clip(vae, frames.frames)
            advance()
        clip_facts = {"path": str(clip.resolve()), "fps": str(frames.fps), **asdict(selection), **asdict(size)}
        entry.save({"mean": mean, "std": std}, {"clip": clip_facts})

    cached = project.produce(entry, compute, force)
    return entry, Artifact("latents", entry.key, entry.path, cached, time.perf_counter() - started)


def prompt_embeddings(session: Session, project: Project, source: ModelSource, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings of `prompts` (stacked), computed once per model, precision and prompts."""
    spec = {"model": source.identity, "prompts": prompts, "precision": session.runtime.precision}
    entry = project.entry("embeddings", spec)

    def compute() -> None:
        components = session.model(source.name)
        limit = components.tokenizer.model_max_length
        for prompt in prompts:
            count = len(components.tokenizer(prompt).input_ids)
            if count > limit:
                session.reporter.note(f"prompt is {count} tokens; the text encoder reads the first {limit}: {prompt!r}")
        entry.save({"embeddings": encode_prompts(components, prompts).float()}, {})

    project.produce(entry, compute)
    return entry.tensors(session.runtime.device)["embeddings"]


def _train(
    session: Session,
    source: ModelSource,
    project: Project,
    latents: Entry,
    checkpoints: Checkpoints,
    run: dict[str, Any],
    prompt: str,
    settings: TuneSettings,
    frame_norm: FrameNorm,
    force: bool,
) -> TrainState:
    """Train from scratch or from the latest usable checkpoint, saving checkpoints as it goes."""
    runtime = session.runtime
    resume = _resume_point(session, checkpoints, settings.steps, force)
    if resume is not None and resume.step == settings.steps:
        return resume  # an earlier run reached exactly this step: nothing to train
    components = session.model(source.name)
    stats = latents.tensors(runtime.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the temporal layers' initial weights
        unet = inflate_unet(components.unet, frame_norm=frame_norm)
    embeds = prompt_embeddings(session, project, source, [prompt])
    session.offload_frozen(source.name)  # the latents and the embedding are all tuning needs
    if runtime.device.type == "cuda":
        _check_memory(unet, stats["mean"].shape, settings, runtime)
    first = resume.step if resume else 0
    written: list[int] = []  # this run's intermediate checkpoints: only the newest is kept

    def save(state: TrainState) -> None:
        checkpoints.save(state.step, train_state_bytes(state, run))
        checkpoints.discard([step for step in written if step != state.step])
        written[:] = [state.step]

    with session.reporter.task("tuning", settings.steps, completed=first) as advance, stop_requests() as stop:
        state = train_delta(
            unet,
            components.scheduler,
            stats["mean"],
            stats["std"],
            components.vae.config.scaling_factor,
            embeds,
            settings,
            runtime,
            advance,
            resume=resume,
            save=save,
            stop_requested=stop,
        )
    save(state)  # the finished run's state, so a longer tune can continue from it
    # Earlier interrupted runs' states below this one are superseded; finished tunes' states stay.
    finished = {step for step in checkpoints.steps() if project.entry("tunes", {**run, "steps": step}).complete}
    checkpoints.discard([step for step in checkpoints.steps() if step < state.step and step not in finished])
    return state


def tune_memory(
    unet: VideoUNet, frames: int, height: int, width: int, checkpointing: bool, precision: str
) -> MemoryEstimate:
    """The estimated peak memory of tuning `unet` on such a clip (see `tavcli.memory`)."""
    return tune_estimate(unet, probe_activations(unet), frames, height, width, checkpointing, precision)


def _check_memory(unet: VideoUNet, shape: torch.Size, settings: TuneSettings, runtime: Runtime) -> None:
    """Stop a GPU tune that would run out of memory half-way, naming settings that fit."""
    frames, height, width = shape[2], shape[3] * 8, shape[4] * 8
    probe = probe_activations(unet)
    estimate = tune_estimate(unet, probe, frames, height, width, settings.gradient_checkpointing, runtime.precision)
    free, _ = torch.cuda.mem_get_info(runtime.device)
    check_fits(estimate, unet, probe, free + torch.cuda.memory_allocated(runtime.device))


def _resume_point(session: Session, checkpoints: Checkpoints, steps: int, force: bool) -> TrainState | None:
    step = None if force else checkpoints.latest_step(at_most=steps)
    if step is None:
        return None
    state = load_train_state(checkpoints, step, session.runtime.device)
    if state.device_type != session.runtime.device.type:
        name = checkpoints.path(step).name
        session.reporter.note(f"checkpoint {name} was made on {state.device_type}: starting over")
        return None
    session.reporter.note(f"resuming from step {state.step} ({checkpoints.path(step)})")
    return state


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
    project, tune_entry = _tune_entry(session, project_root, tune_key)
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
    plan = plan_edit(session, request)
    started = time.perf_counter()
    computed = _sample_edits(session, plan, request.settings, force)
    share = (time.perf_counter() - started) / max(len(computed), 1)  # sampling time per computed prompt
    return [_render(session, plan, request, prompt, prompt not in computed, share) for prompt in plan.entries]


def plan_edit(session: Session, request: EditRequest) -> EditPlan:
    """Resolve the project, tune and inversion (inverting now if needed) and the control, before any sampling."""
    project, tune_entry = _tune_entry(session, request.project, request.tune_key)
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


def edit_entries(
    project: Project, inversion_key: str, request: EditRequest, runtime: Runtime, control: dict[str, Any] | None
) -> dict[str, Entry]:
    """Each prompt's edit entry, keyed with the size of the UNet batch it is sampled in."""
    return {
        prompt: edit_entry(project, inversion_key, prompt, request.settings, runtime, control, len(group))
        for group in request.groups
        for prompt in group
    }


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
        maps = canny_maps(_source_frames(session, tune_entry, latents, clip))
    controlnet = load_controlnet(control.model, session.runtime.device, session.runtime.dtype)
    return ControlGuide(controlnet, maps, control.scale), control_key(control)


def control_key(control: ControlSpec) -> dict[str, Any]:
    """What identifies a control in an edit's key: its kind, ControlNet, condition maps' source and strength."""
    maps = file_sha256(control.video) if control.video is not None else CANNY_OF_SOURCE
    return {"kind": control.kind, "model": controlnet_identity(control.model), "maps": maps, "scale": control.scale}


def _output_rate(request: EditRequest, clip: dict[str, Any], reporter: Reporter) -> Fraction | None:
    """The output's frame rate: --fps, else the tuned frames' rate (GIFs at most GIF_MAX_FPS); None for PNGs."""
    if request.format == "frames":
        return None  # PNG frames carry no rate
    if request.fps is not None:
        return Fraction(request.fps).limit_denominator(1001)
    rate = Fraction(clip["fps"])
    if request.format == "gif" and rate > GIF_MAX_FPS:
        reporter.note(f"GIFs play at most {GIF_MAX_FPS:g} fps: writing {GIF_MAX_FPS:g} instead of {float(rate):.3g}")
        return Fraction(GIF_MAX_FPS)
    return rate


def _output_path(
    folder: Path, prompt: str, key: str, fmt: OutputFormat, rate: Fraction | None, source: Fraction
) -> Path:
    """`PROMPT-SLUG-KEY.mp4`; a rate other than the source's is part of the name (`...-KEY-2fps.gif`)."""
    name = f"{_slug(prompt)}-{key[:8]}"
    if rate is not None and rate != source:
        name += f"-{float(rate):.6g}fps"
    return folder / (name if fmt == "frames" else f"{name}.{fmt}")


def _render(
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
        write_sidecar(output, _edit_record(session, plan, request, prompt, rate, frames.shape))
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
    project, tune_entry = _tune_entry(session, project_root, None)
    latents = project.find("latents", tune_entry.spec["latents"])
    clip = latents.meta()["clip"]
    source = _source_frames(session, tune_entry, latents, clip)
    clips = [source, *(read_frames(edit.path) for edit in edits)]
    captions = [f"source: {tune_entry.spec['prompt']}", *(str(edit.details["prompt"]) for edit in edits)]
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(clip["fps"])
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


def _source_frames(session: Session, tune_entry: Entry, latents: Entry, clip: dict[str, Any]) -> np.ndarray:
    """The frames the project was tuned on: from the clip if it is still there, else decoded from its latents."""
    path = Path(clip["path"])
    if path.is_file():
        selection = FrameSelection(frames=clip["frames"], stride=clip["stride"], start=clip["start"])
        return read_clip(path, selection, FrameSize(clip["width"], clip["height"], clip["resize"])).frames
    vae = session.model(tune_entry.meta()["model"]["model"]).vae
    mean = latents.tensors(session.runtime.device)["mean"]
    return decode_latents(vae, mean * vae.config.scaling_factor)


def _edit_record(
    session: Session,
    plan: EditPlan,
    request: EditRequest,
    prompt: str,
    rate: Fraction | None,
    shape: tuple[int, ...],
) -> dict[str, Any]:
    """Everything needed to reproduce the output, including the commands that would."""
    meta, entry = plan.tune.meta(), plan.entries[prompt]
    group = next(group for group in plan.groups if prompt in group)
    used = _control_record(request.control)
    return {
        "tav_version": __version__,
        "project": str(plan.project.root.resolve()),
        "environment": _environment(session.runtime.device, entry.spec["precision"]),
        "model": meta["model"],
        "clip": meta["clip"],
        "tune": {"key": plan.tune.key, **plan.tune.spec},
        "inversion": {"key": plan.inversion.key, **plan.inversion.spec},
        "edit": {"key": entry.key, **entry.spec},
        **({} if len(group) == 1 else {"batch": group}),
        **({} if used is None else {"control": used}),
        "output": {
            "format": request.format,
            "fps": None if rate is None else str(rate),
            "frames": shape[0],
            "height": shape[1],
            "width": shape[2],
        },
        "reproduce": _reproduce(session, plan, request, prompt, rate),
    }


def _reproduce(session: Session, plan: EditPlan, request: EditRequest, prompt: str, rate: Fraction | None) -> list[str]:
    """The `tav tune`, `tav invert` and `tav edit` commands that compute this output again, bit for bit on
    the same device and library versions (the batch it was sampled in included)."""
    meta, tune, inversion = plan.tune.meta(), plan.tune.spec, plan.inversion.spec
    edit_spec = plan.entries[prompt].spec
    group = next(group for group in plan.groups if prompt in group)
    clip, project = meta["clip"], str(plan.project.root.resolve())
    model = parse_model_name(meta["model"]["model"])
    trust = ["--trust-pickle"] if session.allow_pickle else []
    tune_cmd = ["tav", "tune", clip["path"], tune["prompt"], "--project", project, "--model", model.base]
    tune_cmd += [] if model.config is None else ["--model-config", model.config]
    tune_cmd += [part for path, scale in model.loras for part in ("--lora", f"{path}:{scale}")]
    tune_cmd += ["--frames", clip["frames"], "--stride", clip["stride"], "--start", clip["start"]]
    tune_cmd += ["--width", clip["width"], "--height", clip["height"], "--resize", clip["resize"]]
    tune_cmd += ["--steps", tune["steps"], "--lr", tune["learning_rate"], "--seed", tune["seed"]]
    tune_cmd += ["--frame-norm", tune["frame_norm"], *_numerics(tune, meta.get("device")), *trust]
    invert_cmd = ["tav", "invert", "--project", project, "--steps", inversion["steps"]]
    invert_cmd += ["--prompt", inversion["prompt"]] if inversion["prompt"] else []
    invert_cmd += [*_numerics(inversion, plan.inversion.meta().get("device")), *trust]
    edit_cmd = ["tav", "edit", *group, "--project", project, "--steps", edit_spec["steps"]]
    edit_cmd += ["--guidance", edit_spec["guidance"], "--eta", edit_spec["eta"]]
    edit_cmd += ["--negative", edit_spec["negative"]] if edit_spec["negative"] else []
    edit_cmd += [] if edit_spec["seed"] is None else ["--seed", edit_spec["seed"]]
    edit_cmd += [] if request.format == "mp4" else ["--format", request.format]
    edit_cmd += [] if rate is None or rate == Fraction(clip["fps"]) else ["--fps", float(rate)]
    edit_cmd += ["--batch-size", len(group)] if len(group) > 1 else []
    edit_cmd += [*_numerics(edit_spec, session.runtime.device.type), *trust]
    control = _control_record(request.control)
    if control is not None:
        edit_cmd += ["--control", control["kind"], "--control-model", control["model"]]
        edit_cmd += ["--control-scale", control["scale"]]
        edit_cmd += [] if control["video"] is None else ["--control-video", control["video"]]
    return [shlex.join(map(str, cmd)) for cmd in (tune_cmd, invert_cmd, edit_cmd)]


def _numerics(spec: dict[str, Any], device: str | None) -> list[str]:
    """The flags that decide how an entry's numbers were computed: precision, --compile, and the device."""
    flags = ["--precision", spec.get("precision", "fp32")] + (["--compile"] if spec.get("compile") else [])
    return flags + ([] if device is None else ["--device", device])


def _tune_entry(session: Session, project_root: Path, tune_key: str | None) -> tuple[Project, Entry]:
    """Tune `tune_key`, or the project's current one."""
    if not project_root.is_dir():
        raise TavError(f"no project at {project_root}", "`tav tune CLIP PROMPT` creates one")
    project = session.project(project_root)
    return project, project.find("tunes", tune_key or project.current_tune())


def _environment(device: torch.device, precision: str) -> dict[str, str]:
    """What produced an output: library versions, device and precision (bit-identical reruns need the same)."""
    import platform

    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {
        "tavcli": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": f"{device} ({name})",
        "precision": precision,
    }


def _control_record(control: ControlSpec | None) -> dict[str, Any] | None:
    """The control options as given, with local paths made absolute, so a sidecar can use them again."""
    if control is None:
        return None
    model = Path(control.model).expanduser()
    return {
        "kind": control.kind,
        "model": str(model.resolve()) if model.is_dir() else control.model,
        "video": None if control.video is None else str(control.video.resolve()),
        "scale": control.scale,
    }


def edit_from_sidecar(session: Session, recorded: RecordedEdit, force: bool = False) -> list[Artifact]:
    """Render an output again from its sidecar (`tavcli.sidecar.recorded_edit`): same project, tune,
    inversion, settings and batch, after checking that its ControlNet and condition clip are unchanged."""
    request, sidecar = recorded.request, recorded.sidecar
    if not (request.project / "tunes" / str(request.tune_key) / "meta.json").is_file():
        raise TavError(
            f"project {request.project} no longer has tune {request.tune_key}",
            f"run the `reproduce` commands in {sidecar} to rebuild it",
        )
    if request.control is not None:
        now, then = control_key(request.control), recorded.record["edit"]["control"]
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
    return [artifact for artifact in edit(session, request, force) if artifact.details["prompt"] == recorded.prompt]


def _current_inversion(session: Session, project: Project, tune_entry: Entry, steps: int) -> Entry:
    """The project's inversion for this tune, or a new one with `steps` DDIM steps."""
    key = project.state.get("inversion")
    if key and (project.root / "inversions" / key / "meta.json").is_file():
        entry = project.find("inversions", key)
        if entry.spec.get("tune") == tune_entry.key:
            return entry
    artifact = invert(session, project.root, steps=steps)
    return project.find("inversions", artifact.key)


def _check_same_model(source: ModelSource, tuned_with: dict[str, str]) -> None:
    if source.revision != tuned_with["revision"]:
        raise TavError(
            f"model {source.name} has changed since this project was tuned "
            f"({tuned_with['revision']} then, {source.revision} now)",
            "tune again with `tav tune`",
        )


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "edit"
