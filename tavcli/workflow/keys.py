"""What each store entry's key is made of (its spec), and what `tav ls` says it is: one place for both.

A spec lists every input that determines an entry (docs/store.md, "What each option does to the
cache"). Fields only some entries have are left out of the others' specs, so adding them kept the
keys of everything computed before. This module imports no torch: `tav ls` describes entries with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tavcli.files.hashing import content_sha256, files_sha256, lora_sha256
from tavcli.models.source import ModelSource
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.editing import EditRequest
from tavcli.settings.options import EDIT, GUIDANCE
from tavcli.settings.sampling import ControlSpec, EditSettings, InversionSettings
from tavcli.settings.tuning import FrameSelection, FrameSize, TuneSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.store.specs import (
    EditSpec,
    EmbeddingsSpec,
    InversionSpec,
    LatentsSpec,
    LoraIdentity,
    NullTextSpec,
    TuneSpec,
)

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
    "null_text_entry",
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
    spec: LatentsSpec = {
        "model": source.identity,
        "clip_sha256": clip_sha256,
        "selection": {"frames": selection.frames, "stride": selection.stride, "start": selection.start},
        "size": {"width": size.width, "height": size.height, "resize": size.resize},
    }
    if precision != "fp32":  # keys that first recorded no precision stay as they were
        spec["precision"] = precision
    return project.entry("latents", spec)


def _latents_what(spec: dict[str, Any]) -> str:
    size, selection = spec.get("size", {}), spec.get("selection", {})
    return f"{selection.get('frames')} frames, {size.get('width')}x{size.get('height')}"


def embeddings_entry(
    project: Project, source: ModelSource, prompts: list[str], precision: str, loras: list[LoraIdentity] | None = None
) -> Entry:
    """The store entry of prompts' CLIP text embeddings: per model, prompts, precision and edit-time LoRAs."""
    spec: EmbeddingsSpec = {"model": source.identity, "prompts": prompts, "precision": precision}
    if loras:
        spec["loras"] = loras
    return project.entry("embeddings", spec)


def _embeddings_what(spec: dict[str, Any]) -> str:
    return ", ".join(map(repr, spec.get("prompts", [])))


def tune_spec(
    latents_key: str, prompt: str, settings: TuneSettings, precision: str, compiled: bool = False
) -> TuneSpec:
    """Everything that determines a tune (`tune_run` drops the steps to name its training run). The fields
    set only sometimes are absent otherwise, so that keys made before they existed stay."""
    # The settings' keyed fields by name (a new one is in the spec with no change here).
    spec = cast(TuneSpec, {"latents": latents_key, "prompt": prompt, **settings.keyed(), "precision": precision})
    if compiled:
        spec["compile"] = True
    return spec


def _tune_what(spec: dict[str, Any]) -> str:
    stored = f", stored in {spec['save_precision']}" if spec.get("save_precision") else ""
    rank = f", rank {spec['rank']}" if spec.get("rank") else ""
    what = f"{spec.get('prompt')!r}, {spec.get('steps')} steps{rank}{stored}"
    return what + (", imported" if spec.get("imported") else "")


def tune_run(spec: Mapping[str, Any]) -> dict[str, Any]:
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
    spec: InversionSpec = {"tune": tune_key, "steps": steps, "prompt": prompt, "formula": INVERSION_FORMULA}
    if runtime.precision != "fp32":
        spec["precision"] = runtime.precision
    if latents_key:
        spec["latents"] = latents_key
    if window:
        spec["window"] = window
    if runtime.compile:
        spec["compile"] = True
    return project.entry("inversions", spec)


def _inversion_what(spec: dict[str, Any]) -> str:
    what = f"{spec.get('steps')} steps" + (f", prompt {spec['prompt']!r}" if spec.get("prompt") else "")
    what += ", other frames" if spec.get("latents") else ""
    return what + (f", window {spec['window']}" if spec.get("window") else "")


# Bump when null-text fitting's numbers change; only null-text embeddings and their edits go stale.
NULL_TEXT_FORMULA = 1


def null_text_entry(
    project: Project, inversion_key: str, settings: EditSettings, inversion: InversionSettings, runtime: Runtime
) -> Entry:
    """The store entry of an inversion's null-text embeddings: fitted at the edit's guidance (every setting
    declared `guides`: one declared `key_omits_default` only away from its default, after the others, as
    `guidance_rescale` was added) with the inversion settings' Adam budget, in the run's precision and
    compilation."""
    guidance = {name: getattr(settings, name) for name in GUIDANCE}
    spec = cast(
        NullTextSpec,
        {
            "inversion": inversion_key,
            **{name: value for name, value in guidance.items() if not EDIT[name].key_omits_default},
            "iterations": inversion.null_iterations,
            "learning_rate": inversion.null_lr,
            "formula": NULL_TEXT_FORMULA,
            **{
                name: value
                for name, value in guidance.items()
                if EDIT[name].key_omits_default and value != EDIT[name].default
            },
        },
    )
    if runtime.precision != "fp32":
        spec["precision"] = runtime.precision
    if runtime.compile:
        spec["compile"] = True
    return project.entry("nulltexts", spec)


def _null_text_what(spec: dict[str, Any]) -> str:
    budget = f"{spec.get('iterations')} iterations at lr {spec.get('learning_rate')}"
    return f"guidance {spec.get('guidance')}, {budget}"


# Bump when attention control's numbers change (its layers, steps, masks): only controlled edits go stale.
ATTENTION_FORMULA = 2


def edit_spec(
    inversion_key: str,
    prompt: str,
    settings: EditSettings,
    runtime: Runtime,
    control: dict[str, Any] | None = None,
    batch: int = 1,
    loras: list[LoraIdentity] | None = None,
    unconditional: tuple[str, str | None] | None = None,
    attention: AttentionSettings | None = None,
) -> EditSpec:
    """Everything that determines an edit. `batch` is how many prompts share its UNet batch: batched
    matrix products round differently, so a batched edit is another entry (absent for 1, like
    `control` when uncontrolled and `loras` without edit-time LoRAs, so that keys of earlier edits stay
    valid). The frames and window come with the inversion's key. A setting declared `key_omits_default`
    is left out at its default, for the same reason. `unconditional` is (the inversion kind, the null-text
    embeddings' key or None) when the unconditional branch is not the negative prompt's. `attention` (when it
    controls anything) adds its settings away from their defaults, with `ATTENTION_FORMULA`."""
    chosen = {
        name: value
        for name, value in asdict(settings).items()
        if not (EDIT[name].key_omits_default and value == EDIT[name].default)
    }
    # Made from the settings' fields by name (a new setting is in the spec with no change here).
    spec = cast(EditSpec, {"inversion": inversion_key, "prompt": prompt, **chosen, "precision": runtime.precision})
    if control is not None:
        spec["control"] = control
    if loras:
        spec["loras"] = loras
    if batch > 1:
        spec["batch"] = batch
    if attention is not None and attention.active:
        spec["attention"] = {**attention.changed(), "formula": ATTENTION_FORMULA}
    if unconditional is not None:
        spec["inversion_kind"] = unconditional[0]
        if unconditional[1] is not None:
            spec["null_text"] = unconditional[1]
    if settings.eta == 0:
        spec["seed"] = None  # deterministic DDIM draws no noise: the seed determines nothing
    if runtime.compile:
        spec["compile"] = True  # compiled kernels round differently
    return spec


def _edit_what(spec: dict[str, Any]) -> str:
    what = f"{spec.get('prompt')!r}, {spec.get('steps')} steps, guidance {spec.get('guidance')}"
    return (
        what
        + (f", batch of {spec['batch']}" if spec.get("batch") else "")
        + (", controlled" if spec.get("control") else "")
        + (", attention control" if spec.get("attention") else "")
        + (f", {len(spec['loras'])} LoRA(s)" if spec.get("loras") else "")
        + (f", {spec['inversion_kind']} inversion" if spec.get("inversion_kind") else "")
    )


def edit_entries(
    project: Project,
    inversion_key: str,
    request: EditRequest,
    runtime: Runtime,
    control: dict[str, Any] | None,
    null_text_key: str | None = None,
) -> dict[str, Entry]:
    """Each prompt's edit entry, keyed with the size of the UNet batch it is sampled in."""
    loras = lora_identity(request.loras)
    kind = request.inversion.inversion
    unconditional = (kind, null_text_key) if request.inversion.reconstructs else None
    settings = request.settings
    return {
        prompt: project.entry(
            "edits",
            edit_spec(
                inversion_key, prompt, settings, runtime, control, len(group), loras, unconditional, request.attention
            ),
        )
        for group in request.groups
        for prompt in group
    }


def lora_identity(loras: tuple[tuple[Path, float], ...]) -> list[LoraIdentity]:
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


# What each kind of entry is, in words: beside the specs above, so `tav ls` and the keys cannot drift.
DESCRIBERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "latents": _latents_what,
    "embeddings": _embeddings_what,
    "tunes": _tune_what,
    "checkpoints": _checkpoints_what,
    "inversions": _inversion_what,
    "nulltexts": _null_text_what,
    "edits": _edit_what,
}
