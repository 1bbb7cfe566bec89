"""What `tav tune`, `tav invert` and `tav edit` do, as plain functions on a project directory.

Each step looks its result up in the project's store first and computes it only when missing.
"""

from __future__ import annotations

import hashlib
import json
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
from tavcli.control import ControlGuide, ControlSpec, canny_maps, controlnet_identity, load_controlnet
from tavcli.errors import TavError
from tavcli.inversion import ddim_inversion
from tavcli.memory import MemoryEstimate, check_fits, probe_activations, tune_estimate
from tavcli.model import FrameNorm, VideoUNet, inflate_unet
from tavcli.models import Components, ModelSource, encode_prompts, load_components, resolve_model, weight_files
from tavcli.progress import Reporter
from tavcli.runtime import Runtime
from tavcli.sampling import ddim_sample
from tavcli.store import TENSORS, Checkpoints, Entry, Project, file_sha256
from tavcli.tune import (
    TrainState,
    TuneSettings,
    decode_latents,
    encode_clip,
    load_train_state,
    stop_requests,
    train_delta,
    train_state_bytes,
)
from tavcli.video import (
    FrameSelection,
    FrameSize,
    OutputFormat,
    ResizeMode,
    contact_sheet,
    probe,
    read_clip,
    read_frames,
    side_by_side,
    snap_to_multiple,
    write_video,
)

__all__ = [
    "Artifact",
    "EditSettings",
    "Session",
    "TuneRequest",
    "default_project",
    "edit",
    "edit_entry",
    "edit_from_sidecar",
    "find_project",
    "frame_size",
    "import_tune",
    "inversion_entry",
    "invert",
    "latents_entry",
    "prompt_embeddings",
    "render_grid",
    "tune",
    "tune_memory",
    "tune_plan",
    "tune_run",
    "tune_spec",
]

PROJECT_SUFFIX = ".tav"
CANNY_OF_SOURCE = "canny of the source clip"  # the maps' source in an edit key when tav computes them
MIN_SIDE, MAX_SIDE = 8, 4096  # pixels: one latent pixel; beyond any SD model's training size


@dataclass(frozen=True)
class EditSettings:
    """DDIM sampling settings of an edit (the reference's: 50 steps, guidance 12.5, eta 0)."""

    steps: int = 50
    guidance: float = 12.5
    negative: str = ""
    seed: int = 33  # only draws noise when eta > 0
    eta: float = 0.0


@dataclass(frozen=True)
class TuneRequest:
    """What to tune: a clip and its description, in which project, on which model, and how."""

    clip: Path
    prompt: str
    project: Path
    model: str  # a model name as `tavcli.modelspec.model_name` builds it
    selection: FrameSelection = field(default_factory=FrameSelection)
    size: FrameSize = field(default_factory=FrameSize)
    settings: TuneSettings = field(default_factory=TuneSettings)
    frame_norm: FrameNorm = "joint"


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


def frame_size(width: int, height: int, resize: ResizeMode, reporter: Reporter) -> FrameSize:
    """The frame size rounded to multiples of 8, with a note when it changed."""
    for option, value in (("--width", width), ("--height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise TavError(
                f"{option} {value} is out of range: frames must be {MIN_SIDE} to {MAX_SIDE} pixels a side",
                "SD 1.x works best at 512, SD 2.x at 768",
            )
    snapped = snap_to_multiple(width), snap_to_multiple(height)
    if snapped != (width, height):
        reporter.note(f"size {width}x{height} rounded to {snapped[0]}x{snapped[1]} (multiples of 8)")
    if resize not in ("crop", "stretch"):
        raise TavError(f"unknown resize mode {resize!r}", "use crop or stretch")
    return FrameSize(width=snapped[0], height=snapped[1], resize=resize)


def default_project(clip: Path) -> Path:
    """`clip.mp4` -> `clip.tav/` beside it."""
    return clip.with_name(clip.stem + PROJECT_SUFFIX)


def find_project(given: Path | None) -> Path:
    """`--project` if given, else the only `*.tav` folder in the current directory."""
    if given is not None:
        return given
    candidates = sorted(p for p in Path.cwd().glob(f"*{PROJECT_SUFFIX}") if p.is_dir())
    if len(candidates) == 1:
        return candidates[0]
    found = "none" if not candidates else ", ".join(p.name for p in candidates)
    raise TavError(f"which project? pass --project (found {found} here)", "`tav tune CLIP PROMPT` creates CLIP.tav")


def latents_entry(
    project: Project, source: ModelSource, clip: Path, selection: FrameSelection, size: FrameSize
) -> Entry:
    """The store entry of a clip's VAE posterior: per model, clip content, frames and size."""
    spec = {
        "model": source.identity,
        "clip_sha256": file_sha256(clip),
        "selection": asdict(selection),
        "size": asdict(size),
    }
    return project.entry("latents", spec)


def tune_spec(latents_key: str, prompt: str, settings: TuneSettings, precision: str, frame_norm: str) -> dict[str, Any]:
    """Everything that determines a tune (`tune_run` drops the steps to name its training run)."""
    return {
        "latents": latents_key,
        "prompt": prompt,
        "steps": settings.steps,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "precision": precision,
        "frame_norm": frame_norm,
    }


def tune_run(spec: dict[str, Any]) -> dict[str, Any]:
    """A tune's spec without its step count: what names the training run its checkpoints belong to."""
    return {k: v for k, v in spec.items() if k != "steps"}


def inversion_entry(project: Project, tune_key: str, steps: int, prompt: str = "") -> Entry:
    return project.entry("inversions", {"tune": tune_key, "steps": steps, "prompt": prompt})


def edit_entry(
    project: Project,
    inversion_key: str,
    prompt: str,
    settings: EditSettings,
    precision: str,
    control: dict[str, Any] | None = None,
) -> Entry:
    spec = {"inversion": inversion_key, "prompt": prompt, **asdict(settings), "precision": precision}
    if control is not None:  # absent when uncontrolled: keys of earlier edits stay valid
        spec["control"] = control
    if settings.eta == 0:
        spec["seed"] = None  # deterministic DDIM draws no noise: the seed determines nothing
    return project.entry("edits", spec)


def tune(session: Session, request: TuneRequest, force: bool = False) -> list[Artifact]:
    """Encode the clip (once) and tune the model on it; make the tune the project's current one.

    Training resumes from the run's latest checkpoint at or below `settings.steps`, so an
    interrupted tune goes on where it stopped and a longer tune continues a shorter one.
    """
    prompt, settings, frame_norm = request.prompt, request.settings, request.frame_norm
    _require_prompt(prompt)
    if settings.steps < 1 or settings.learning_rate <= 0 or settings.checkpoint_every < 0:
        raise TavError("--steps must be at least 1, --lr positive and --checkpoint-every not negative")
    probe(request.clip)  # a bad clip should fail before a slow model load
    _require_folder(request.project, "--project")
    source = session.source(request.model)
    project = session.project(request.project)
    latents, latents_artifact = _clip_latents(
        session, source, project, request.clip, request.selection, request.size, force
    )
    spec = tune_spec(latents.key, prompt, settings, session.runtime.precision, frame_norm)
    entry = project.entry("tunes", spec)
    run = tune_run(spec)
    checkpoints = project.checkpoints(run)
    started = time.perf_counter()

    def compute() -> None:
        state = _train(session, source, project, latents, checkpoints, run, prompt, settings, frame_norm, force)
        facts = {
            "model": source.identity,
            "clip": latents.meta()["clip"],
            "losses": state.losses,
            "seconds": time.perf_counter() - started,
            "gradient_checkpointing": settings.gradient_checkpointing,
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
    _require_prompt(request.prompt)
    probe(request.clip)
    source = session.source(request.model)
    project = session.project(request.project)
    latents = latents_entry(project, source, request.clip, selection, size)
    spec = tune_spec(latents.key, request.prompt, settings, session.runtime.precision, request.frame_norm)
    entry = project.entry("tunes", spec)
    resume = project.checkpoints(tune_run(spec)).latest_step(settings.steps)
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

    prompt = request.prompt
    _require_prompt(prompt)
    probe(request.clip)
    _require_folder(request.project, "--project")
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
    entry = latents_entry(project, source, clip, selection, size)

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
    path = None if force else checkpoints.latest(at_most=steps)
    if path is None:
        return None
    state = load_train_state(path, session.runtime.device)
    if state.device_type != session.runtime.device.type:
        session.reporter.note(f"checkpoint {path.name} was made on {state.device_type}: starting over")
        return None
    session.reporter.note(f"resuming from step {state.step} ({path})")
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
    _require_ddim_steps(steps)
    project, tune_entry = _tune_entry(session, project_root, tune_key)
    entry = inversion_entry(project, tune_entry.key, steps, prompt)
    started = time.perf_counter()

    def compute() -> None:
        components, unet = session.tuned_unet(project, tune_entry)
        stats = project.find("latents", tune_entry.spec["latents"]).tensors(session.runtime.device)
        latents = stats["mean"] * components.vae.config.scaling_factor
        embeds = prompt_embeddings(session, project, components.source, [prompt])
        with session.reporter.task("inverting", steps) as advance, session.runtime.autocast():
            trajectory = ddim_inversion(unet, components.scheduler, latents, embeds, steps, lambda *_: advance())
        entry.save({"trajectory": torch.stack(trajectory).float()}, {"seconds": time.perf_counter() - started})

    cached = project.produce(entry, compute, force)
    if tune_key is None:
        project.update_state(inversion=entry.key)
    return Artifact("inversion", entry.key, entry.path, cached, time.perf_counter() - started, {"steps": steps})


def edit(
    session: Session,
    project_root: Path,
    prompts: list[str],
    settings: EditSettings,
    out_dir: Path | None = None,
    fmt: OutputFormat = "mp4",
    fps: float | None = None,
    force: bool = False,
    tune_key: str | None = None,
    invert_steps: int | None = None,
    invert_prompt: str = "",
    batch_size: int = 1,
    control: ControlSpec | None = None,
) -> list[Artifact]:
    """Render one clip per prompt from the inverted noise (inverting first if needed).

    Without `tune_key` the project's current tune and inversion are used; with it (as `tav batch`
    does) that tune and its inversion with `invert_steps` (default: the sampling steps).
    Up to `batch_size` prompts are sampled together (one UNet batch), which keeps a GPU busy;
    with eta > 0 each prompt is sampled alone so that its noise does not depend on the others.
    """
    if not prompts:
        raise TavError("give at least one edit prompt")
    for prompt in prompts:
        _require_prompt(prompt)
    _require_ddim_steps(settings.steps)
    if fps is not None and fps <= 0:
        raise TavError("--fps must be positive")
    if batch_size < 1:
        raise TavError("--batch-size must be at least 1")
    if out_dir is not None:
        _require_folder(out_dir, "--out")
    project, tune_entry = _tune_entry(session, project_root, tune_key)
    if tune_key is None:
        inversion = _current_inversion(session, project, tune_entry, invert_steps or settings.steps)
    else:
        artifact = invert(session, project_root, invert_steps or settings.steps, invert_prompt, tune_key=tune_key)
        inversion = project.find("inversions", artifact.key)
    guide, control_spec = _control(session, project, tune_entry, control)
    precision = session.runtime.precision
    entries = {p: edit_entry(project, inversion.key, p, settings, precision, control_spec) for p in prompts}
    started = time.perf_counter()
    computed = _sample_edits(session, project, tune_entry, inversion, entries, settings, batch_size, force, guide)
    share = (time.perf_counter() - started) / max(len(computed), 1)  # sampling time per computed prompt
    out_dir = out_dir or project.root / "renders"
    return [
        _render(
            session, project, tune_entry, inversion, entries[p], out_dir, fmt, fps, p not in computed, share, control
        )
        for p in prompts
    ]


def _sample_edits(
    session: Session,
    project: Project,
    tune_entry: Entry,
    inversion: Entry,
    entries: dict[str, Entry],
    settings: EditSettings,
    batch_size: int,
    force: bool,
    guide: ControlGuide | None = None,
) -> set[str]:
    """Sample the edits the store lacks, `batch_size` prompts per UNet batch; return the prompts computed."""
    runtime = session.runtime
    pending = [p for p, e in entries.items() if force or not e.complete]
    size = batch_size if settings.eta == 0 else 1
    computed: set[str] = set()
    for group in (pending[i : i + size] for i in range(0, len(pending), size)):
        with ExitStack() as locks:
            for prompt in sorted(group, key=lambda p: entries[p].key):  # one order: no deadlock
                locks.enter_context(project.lock(f"edits-{entries[prompt].key}"))
            group = [p for p in group if force or not entries[p].complete]  # another process may have made some
            if not group:
                continue
            components, unet = session.tuned_unet(project, tune_entry)
            noise = inversion.tensors(runtime.device)["trajectory"][-1]
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
                    control=guide,
                )
            for prompt, sample in zip(group, latents.split(1), strict=True):
                entries[prompt].save({"latents": sample.float()}, {"batch": len(group)})
                computed.add(prompt)
    return computed


def _control(
    session: Session, project: Project, tune_entry: Entry, control: ControlSpec | None
) -> tuple[ControlGuide | None, dict[str, Any] | None]:
    """The ControlNet guide for this project's frames, and what identifies it in the edits' keys."""
    if control is None:
        return None, None
    control.check()
    latents = project.find("latents", tune_entry.spec["latents"])
    clip = latents.meta()["clip"]
    selection = FrameSelection(frames=clip["frames"], stride=clip["stride"], start=clip["start"])
    size = FrameSize(clip["width"], clip["height"], clip["resize"])
    if control.video is not None:
        maps = read_clip(control.video, selection, size).frames
    else:
        maps = canny_maps(_source_frames(session, tune_entry, latents, clip))
    controlnet = load_controlnet(control.model, session.runtime.device, session.runtime.dtype)
    return ControlGuide(controlnet, maps, control.scale), control_key(control)


def control_key(control: ControlSpec) -> dict[str, Any]:
    """What identifies a control in an edit's key: its kind, ControlNet, condition maps' source and strength."""
    maps = file_sha256(control.video) if control.video is not None else CANNY_OF_SOURCE
    return {"kind": control.kind, "model": controlnet_identity(control.model), "maps": maps, "scale": control.scale}


def _render(
    session: Session,
    project: Project,
    tune_entry: Entry,
    inversion: Entry,
    entry: Entry,
    out_dir: Path,
    fmt: OutputFormat,
    fps: float | None,
    cached: bool,
    sampling_seconds: float,
    control: ControlSpec | None,
) -> Artifact:
    """Write the edit's clip and sidecar unless both exist from an earlier run."""
    started = time.perf_counter()
    prompt = entry.spec["prompt"]
    clip = project.find("latents", tune_entry.spec["latents"]).meta()["clip"]
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(clip["fps"])
    suffix = "" if fmt == "frames" else f".{fmt}"
    output = out_dir / f"{_slug(prompt)}-{entry.key[:8]}{suffix}"
    sidecar = output.with_name(output.name + ".json") if suffix else output.with_suffix(".json")
    rendered = cached and output.exists() and sidecar.exists()
    if not rendered:  # outputs are written atomically: a concurrent render of the same edit is harmless
        vae = session.model(tune_entry.meta()["model"]["model"]).vae
        frames = decode_latents(vae, entry.tensors(session.runtime.device)["latents"])
        write_video(frames, output, fmt, rate)
        _write_sidecar(
            sidecar, session.runtime.device, project, tune_entry, inversion, entry, fmt, rate, frames.shape, control
        )
    seconds = time.perf_counter() - started + (0.0 if cached else sampling_seconds)
    details = {"prompt": prompt, "sidecar": str(sidecar), "format": fmt}
    return Artifact("edit", entry.key, output, rendered, seconds, details)


def render_grid(session: Session, project_root: Path, edits: list[Artifact], fps: float | None = None) -> Artifact:
    """The source clip and each edit side by side (mp4 and GIF, prompts as captions) and a PNG contact sheet."""
    started = time.perf_counter()
    project, tune_entry = _tune_entry(session, project_root, None)
    latents = project.find("latents", tune_entry.spec["latents"])
    clip = latents.meta()["clip"]
    source = _source_frames(session, tune_entry, latents, clip)
    clips = [source, *(read_frames(edit.path) for edit in edits)]
    captions = [f"source: {tune_entry.spec['prompt']}", *(str(edit.details["prompt"]) for edit in edits)]
    key = hashlib.sha256(":".join(edit.key for edit in edits).encode()).hexdigest()[:8]
    folder = edits[0].path.parent
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(clip["fps"])
    grid = side_by_side(clips, captions)
    video = write_video(grid, folder / f"grid-{key}.mp4", "mp4", rate)
    gif = write_video(grid, folder / f"grid-{key}.gif", "gif", rate)
    sheet = folder / f"grid-{key}-sheet.png"
    with atomic_path(sheet) as temp:
        contact_sheet(clips, captions).save(temp, format="PNG")
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


def _write_sidecar(
    path: Path,
    session_device: torch.device,
    project: Project,
    tune_entry: Entry,
    inversion: Entry,
    edit_entry: Entry,
    fmt: str,
    fps: Fraction,
    shape: tuple[int, ...],
    control: ControlSpec | None,
) -> None:
    """Everything needed to reproduce the output, including the commands that would."""
    from tavcli.atomic import write_json

    meta = tune_entry.meta()
    clip, tune_spec, edit_spec = meta["clip"], tune_entry.spec, edit_entry.spec
    tune_cmd = ["tav", "tune", clip["path"], tune_spec["prompt"], "--project", str(project.root.resolve())]
    tune_cmd += ["--model", meta["model"]["model"], "--frames", clip["frames"], "--stride", clip["stride"]]
    tune_cmd += ["--start", clip["start"], "--width", clip["width"], "--height", clip["height"]]
    tune_cmd += ["--resize", clip["resize"], "--steps", tune_spec["steps"], "--lr", tune_spec["learning_rate"]]
    tune_cmd += ["--seed", tune_spec["seed"], "--precision", tune_spec["precision"]]
    tune_cmd += ["--frame-norm", tune_spec["frame_norm"]]
    invert_cmd = ["tav", "invert", "--project", str(project.root.resolve()), "--steps", inversion.spec["steps"]]
    edit_cmd = ["tav", "edit", edit_spec["prompt"], "--project", str(project.root.resolve())]
    edit_cmd += [
        "--steps",
        edit_spec["steps"],
        "--guidance",
        edit_spec["guidance"],
        "--negative",
        edit_spec["negative"],
    ]
    edit_cmd += ["--eta", edit_spec["eta"], "--format", fmt, "--fps", float(fps)]
    edit_cmd += [] if edit_spec["seed"] is None else ["--seed", edit_spec["seed"]]
    used = _control_record(control)
    if used is not None:
        edit_cmd += ["--control", used["kind"], "--control-model", used["model"], "--control-scale", used["scale"]]
        edit_cmd += [] if used["video"] is None else ["--control-video", used["video"]]
    write_json(
        path,
        {
            "tav_version": __version__,
            "project": str(project.root.resolve()),
            "environment": _environment(session_device, edit_spec["precision"]),
            "model": meta["model"],
            "clip": clip,
            "tune": {"key": tune_entry.key, **tune_spec},
            "inversion": {"key": inversion.key, **inversion.spec},
            "edit": {"key": edit_entry.key, **edit_spec},
            **({} if used is None else {"control": used}),
            "output": {"format": fmt, "fps": str(fps), "frames": shape[0], "height": shape[1], "width": shape[2]},
            "reproduce": [shlex.join(map(str, cmd)) for cmd in (tune_cmd, invert_cmd, edit_cmd)],
        },
    )


def _tune_entry(session: Session, project_root: Path, tune_key: str | None) -> tuple[Project, Entry]:
    """Tune `tune_key`, or the project's current one."""
    project = session.project(project_root)
    if not project_root.is_dir():
        raise TavError(f"no project at {project_root}", "`tav tune CLIP PROMPT` creates one")
    key = tune_key or project.state.get("tune")
    if not key:
        raise TavError(
            f"project {project_root} was never tuned", f"run `tav tune CLIP PROMPT --project {project_root}`"
        )
    return project, project.find("tunes", key)


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


def edit_from_sidecar(session: Session, sidecar: Path, out_dir: Path | None, force: bool) -> list[Artifact]:
    """Render an output again from its JSON sidecar: same project, tune, inversion and edit settings."""
    try:
        record = json.loads(sidecar.read_text())
        project_root = Path(record["project"])
        edit_spec, output = record["edit"], record["output"]
        settings = EditSettings(
            steps=edit_spec["steps"],
            guidance=edit_spec["guidance"],
            negative=edit_spec["negative"],
            seed=edit_spec["seed"] if edit_spec["seed"] is not None else EditSettings.seed,
            eta=edit_spec["eta"],
        )
        tune_key, inversion = record["tune"]["key"], record["inversion"]
        fmt, fps = output["format"], float(Fraction(output["fps"]))
        control = _sidecar_control(record, sidecar)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TavError(f"{sidecar} is not a tav sidecar: {error}", "give the .json written beside an output") from None
    if not (project_root / "tunes" / tune_key / "meta.json").is_file():
        raise TavError(
            f"project {project_root} no longer has tune {tune_key}",
            f"run the `reproduce` commands in {sidecar} to rebuild it",
        )
    return edit(
        session,
        project_root,
        [edit_spec["prompt"]],
        settings,
        out_dir if out_dir is not None else sidecar.parent,
        fmt,
        fps,
        force,
        tune_key=tune_key,
        invert_steps=inversion["steps"],
        invert_prompt=inversion["prompt"],
        control=control,
    )


def _sidecar_control(record: dict[str, Any], sidecar: Path) -> ControlSpec | None:
    """The control a sidecar's edit used, checked to be the same ControlNet and condition clip still."""
    recorded = record["edit"].get("control")
    if not recorded:
        return None
    if "control" not in record:
        raise TavError(
            f"{sidecar} records a controlled edit but not its condition clip (an older tav wrote it)",
            "run `tav edit` again with the same --control options",
        )
    used = record["control"]
    video = None if used["video"] is None else Path(used["video"])
    if video is not None and not video.is_file():
        raise TavError(f"the condition clip {video} of {sidecar} is gone", "put it back, or edit again with --control")
    control = ControlSpec(kind=used["kind"], model=used["model"], video=video, scale=used["scale"])
    now = control_key(control)
    names = {"model": f"the ControlNet {used['model']}", "maps": f"the condition clip {video}"}
    changed = [names[part] for part in names if now[part] != recorded[part]]
    if changed:
        raise TavError(
            f"{' and '.join(changed)} changed since {sidecar} was written",
            "edit again with --control to render the new one",
        )
    return control


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


def _require_ddim_steps(steps: int) -> None:
    # SD schedulers have 1000 training timesteps and steps_offset 1: 1000 DDIM steps would step past t=999.
    if not 1 <= steps <= 999:
        raise TavError(f"--steps must be between 1 and 999, not {steps}", "50 is the usual choice")


def _require_folder(path: Path, option: str) -> None:
    if path.exists() and not path.is_dir():
        raise TavError(f"{option} {path} is a file, not a folder")


def _require_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise TavError("the prompt is empty", 'describe the clip, e.g. "a man is skiing"')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise TavError("the prompt is not valid UTF-8 text", "check the shell's or the file's encoding") from None


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "edit"
