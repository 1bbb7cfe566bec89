"""What each store entry's key is made of (its spec), and what `tav ls` says it is: one place for both.

A spec lists every input that determines an entry (docs/store.md, "What each option does to the
cache"). Fields only some entries have are left out of the others' specs, so adding them kept the
keys of everything computed before. This module imports no torch: `tav ls` describes entries with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tavcli.files.hashing import content_sha256, files_sha256, lora_sha256
from tavcli.models.source import ModelSource
from tavcli.settings.options import EDIT
from tavcli.settings.requests import ControlSpec, EditRequest, EditSettings, FrameSelection, FrameSize, TuneSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project

if TYPE_CHECKING:  # an annotation only: the runtime imports torch, which `tav ls` must not load
    from tavcli.runtime import Runtime

__all__ = [
    "CANNY_OF_SOURCE",
    "DESCRIBERS",
    "control_key",
    "controlnet_identity",
    "describe",
    "edit_entries",
    "edit_spec",
    "embeddings_entry",
    "inversion_entry",
    "latents_entry",
    "lora_identity",
    "tune_run",
    "tune_spec",
]

CANNY_OF_SOURCE = "canny of the source clip"  # the maps' source in an edit key when tav computes them


def describe(kind: str, spec: dict[str, Any]) -> str:
    """What an entry is, in a few words (the "what" of `tav ls`), from the spec its key is made of."""
    describer = DESCRIBERS.get(kind)
    return describer(spec) if describer else ""


def latents_entry(
    project: Project, source: ModelSource, clip_sha256: str, selection: FrameSelection, size: FrameSize, precision: str
) -> Entry:
    """The store entry of a clip's VAE posterior: per model, clip content (its SHA-256), frames, size and VAE
    precision."""
    spec = {
        "model": source.identity,
        "clip_sha256": clip_sha256,
        "selection": asdict(selection),
        "size": asdict(size),
        **_unless_fp32(precision),
    }
    return project.entry("latents", spec)


def _latents_what(spec: dict[str, Any]) -> str:
    size, selection = spec.get("size", {}), spec.get("selection", {})
    return f"{selection.get('frames')} frames, {size.get('width')}x{size.get('height')}"


def embeddings_entry(
    project: Project, source: ModelSource, prompts: list[str], precision: str, loras: list[dict[str, Any]] | None = None
) -> Entry:
    """The store entry of prompts' CLIP text embeddings: per model, prompts, precision and edit-time LoRAs."""
    spec = {"model": source.identity, "prompts": prompts, "precision": precision, **({"loras": loras} if loras else {})}
    return project.entry("embeddings", spec)


def _embeddings_what(spec: dict[str, Any]) -> str:
    return ", ".join(map(repr, spec.get("prompts", [])))


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
        **_unless_fp32(settings.save_precision, "save_precision"),
        **({"rank": settings.rank} if settings.rank else {}),  # absent for whole projections: earlier keys stay
    }


def _tune_what(spec: dict[str, Any]) -> str:
    stored = f", stored in {spec['save_precision']}" if spec.get("save_precision") else ""
    rank = f", rank {spec['rank']}" if spec.get("rank") else ""
    what = f"{spec.get('prompt')!r}, {spec.get('steps')} steps{rank}{stored}"
    return what + (", imported" if spec.get("imported") else "")


def tune_run(spec: dict[str, Any]) -> dict[str, Any]:
    """A tune's spec without its step count and stored precision: what names the training run its
    checkpoints belong to (runs that differ only there train alike)."""
    return {k: v for k, v in spec.items() if k not in ("steps", "save_precision")}


def _checkpoints_what(spec: dict[str, Any]) -> str:
    return f"{spec.get('prompt', '')!r} at steps {', '.join(map(str, spec.get('steps', [])))}"


# Bump when the inversion's numbers change for some models (2: v-prediction outputs are converted to
# noise at the timestep the model was asked at). Only inversions and the edits made from them go stale.
INVERSION_FORMULA = 2


def inversion_entry(
    project: Project,
    tune_key: str,
    steps: int,
    prompt: str,
    runtime: Runtime,
    latents_key: str | None = None,
    window: int | None = None,
) -> Entry:
    """The store entry of a tune's DDIM inversion: its steps, prompt, precision and compilation, and, for
    frames other than the tuned ones, their latents (`latents_key`) and the window they are processed in."""
    spec = {"tune": tune_key, "steps": steps, "prompt": prompt, **_unless_fp32(runtime.precision)}
    frames: dict[str, Any] = {"latents": latents_key} if latents_key else {}
    frames |= {"window": window} if window else {}
    return project.entry("inversions", {**spec, **frames, **_compiled(runtime.compile), "formula": INVERSION_FORMULA})


def _inversion_what(spec: dict[str, Any]) -> str:
    what = f"{spec.get('steps')} steps" + (f", prompt {spec['prompt']!r}" if spec.get("prompt") else "")
    what += ", other frames" if spec.get("latents") else ""
    return what + (f", window {spec['window']}" if spec.get("window") else "")


def edit_spec(
    inversion_key: str,
    prompt: str,
    settings: EditSettings,
    runtime: Runtime,
    control: dict[str, Any] | None = None,
    batch: int = 1,
    loras: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything that determines an edit. `batch` is how many prompts share its UNet batch: batched
    matrix products round differently, so a batched edit is another entry (absent for 1, like
    `control` when uncontrolled and `loras` without edit-time LoRAs, so that keys of earlier edits stay
    valid). The frames and window come with the inversion's key. A setting declared `key_omits_default`
    is left out at its default, for the same reason."""
    chosen = {
        name: value
        for name, value in asdict(settings).items()
        if not (EDIT[name].key_omits_default and value == EDIT[name].default)
    }
    spec = {"inversion": inversion_key, "prompt": prompt, **chosen, "precision": runtime.precision}
    if control is not None:
        spec["control"] = control
    if loras:
        spec["loras"] = loras
    if batch > 1:
        spec["batch"] = batch
    if settings.eta == 0:
        spec["seed"] = None  # deterministic DDIM draws no noise: the seed determines nothing
    return {**spec, **_compiled(runtime.compile)}


def _edit_what(spec: dict[str, Any]) -> str:
    what = f"{spec.get('prompt')!r}, {spec.get('steps')} steps, guidance {spec.get('guidance')}"
    return (
        what
        + (f", batch of {spec['batch']}" if spec.get("batch") else "")
        + (", controlled" if spec.get("control") else "")
        + (f", {len(spec['loras'])} LoRA(s)" if spec.get("loras") else "")
    )


def edit_entries(
    project: Project, inversion_key: str, request: EditRequest, runtime: Runtime, control: dict[str, Any] | None
) -> dict[str, Entry]:
    """Each prompt's edit entry, keyed with the size of the UNet batch it is sampled in."""
    loras = lora_identity(request.loras)
    return {
        prompt: project.entry(
            "edits", edit_spec(inversion_key, prompt, request.settings, runtime, control, len(group), loras)
        )
        for group in request.groups
        for prompt in group
    }


def lora_identity(loras: tuple[tuple[Path, float], ...]) -> list[dict[str, Any]]:
    """What identifies edit-time LoRAs in keys: each one's content hash and scale, in order (not its path, nor
    whether it was given as its file or its folder)."""
    return [{"sha256": lora_sha256(path), "scale": scale} for path, scale in loras]


def control_key(control: ControlSpec) -> dict[str, Any]:
    """What identifies a control in an edit's key: its kind, ControlNet, condition maps' source and strength."""
    maps = content_sha256(control.video) if control.video is not None else CANNY_OF_SOURCE
    return {"kind": control.kind, "model": controlnet_identity(control.model), "maps": maps, "scale": control.scale}


def controlnet_identity(name: str) -> str:
    """What identifies a ControlNet in edit keys: a local folder's path and content hash, else the hub id."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    return f"{path.resolve()}@sha256-{files_sha256(path, (p for p in path.rglob('*') if p.is_file()))}"


def _unless_fp32(precision: str, field: str = "precision") -> dict[str, str]:
    """A precision in keys that first recorded none (latents, inversions, stored tunes): fp32 keys stay as they were."""
    return {} if precision == "fp32" else {field: precision}


def _compiled(compiled: bool) -> dict[str, bool]:
    """`--compile` in the keys of what the UNet computes: compiled kernels round differently."""
    return {"compile": True} if compiled else {}


# What each kind of entry is, in words: beside the specs above, so `tav ls` and the keys cannot drift.
DESCRIBERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "latents": _latents_what,
    "embeddings": _embeddings_what,
    "tunes": _tune_what,
    "checkpoints": _checkpoints_what,
    "inversions": _inversion_what,
    "edits": _edit_what,
}
