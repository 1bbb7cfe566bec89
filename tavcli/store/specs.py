"""The JSON each kind of entry holds: its spec (what its key is made of) and the facts its `meta.json` adds.

These are the records as they are on disk, typed: `tavcli.workflow.keys` builds the specs, the workflow
writes the facts, and both are read back by name. A field only some entries have is optional (`total=False`
parts), because adding it to every spec would have changed the keys of everything computed before.
docs/store.md describes each field. This module imports no torch.
"""

from __future__ import annotations

from typing import TypedDict

from tavcli.choices import ResizeMode

__all__ = [
    "ClipFacts",
    "EditSpec",
    "EmbeddingsSpec",
    "InversionSpec",
    "LatentsFacts",
    "LatentsSpec",
    "LoraIdentity",
    "NullTextSpec",
    "TuneFacts",
    "TuneSpec",
]


class LoraIdentity(TypedDict):
    """An edit-time LoRA in keys: its content's SHA-256 and scale (not its path)."""

    sha256: str
    scale: float


class _ClipFacts(TypedDict):
    path: str
    fps: str
    frames: int
    stride: int
    start: int
    width: int
    height: int
    resize: ResizeMode


class ClipFacts(_ClipFacts, total=False):
    """A latents entry's clip: the file, its frame rate (a fraction, as text) and the frames taken; SDXL's six
    size numbers (`tavcli.models.conditioning.SizeConditioning`) in entries made since SDXL came."""

    size_conditioning: list[int]


class SelectionSpec(TypedDict):
    frames: int
    stride: int
    start: int


class SizeSpec(TypedDict):
    width: int
    height: int
    resize: ResizeMode


class _LatentsSpec(TypedDict):
    model: dict[str, str]  # ModelSource.identity: the model's name and the revision it resolved to
    clip_sha256: str
    selection: SelectionSpec
    size: SizeSpec


class LatentsSpec(_LatentsSpec, total=False):
    """A clip's VAE posterior: per model, clip content, frames, size; `precision` unless fp32."""

    precision: str


class LatentsFacts(TypedDict):
    clip: ClipFacts


class _EmbeddingsSpec(TypedDict):
    model: dict[str, str]  # ModelSource.identity: the model's name and the revision it resolved to
    prompts: list[str]
    precision: str


class EmbeddingsSpec(_EmbeddingsSpec, total=False):
    """Prompts' text embeddings: per model, prompts, precision, and the edit-time LoRAs when there are any."""

    loras: list[LoraIdentity]


class _TuneSpec(TypedDict):
    latents: str
    prompt: str
    steps: int
    learning_rate: float
    seed: int
    precision: str
    frame_norm: str


class TuneSpec(_TuneSpec, total=False):
    """A tune; `compile`, `save_precision` (unless fp32), `rank` (when low-rank) and `imported` only when set.
    Beside these, every keyed tune setting by its field name (`TuneSettings.keyed`: a new one, such as
    `weight_decay` away from its default, is in the spec with no change here)."""

    compile: bool
    save_precision: str
    rank: int
    imported: bool


class _TuneFacts(TypedDict):
    model: dict[str, str]  # ModelSource.identity: the model's name and the revision it resolved to
    clip: ClipFacts
    losses: list[float]
    tav_version: str


class TuneFacts(_TuneFacts, total=False):
    """What a tune's meta.json adds: the model, the clip, the loss per step, and how it was computed (or
    which tune it was rounded from, or which reference folder it was imported from)."""

    seconds: float
    temporal_init: str
    gradient_checkpointing: bool
    device: str
    rounded_from: str
    imported_from: str


class _InversionSpec(TypedDict):
    tune: str
    steps: int
    prompt: str
    formula: int


class InversionSpec(_InversionSpec, total=False):
    """A DDIM inversion; `latents` and `window` for frames other than the tuned ones, all at once."""

    precision: str
    latents: str
    window: int
    compile: bool


class _NullTextSpec(TypedDict):
    inversion: str
    guidance: float
    iterations: int
    learning_rate: float
    formula: int


class NullTextSpec(_NullTextSpec, total=False):
    """Null-text embeddings: one unconditional embedding per step of an inversion (made with the source
    prompt), fitted at one guidance with one Adam budget; `guidance_rescale`, `precision`, `compile` when set."""

    guidance_rescale: float
    precision: str
    compile: bool


class _EditSpec(TypedDict):
    inversion: str
    prompt: str
    steps: int
    guidance: float
    negative: str
    seed: int | None  # None when eta is 0: deterministic DDIM draws no noise
    eta: float
    precision: str


class EditSpec(_EditSpec, total=False):
    """An edit; settings declared `key_omits_default` appear only away from their defaults."""

    guidance_rescale: float
    inversion_kind: str  # "null-text" or "negative-prompt"; absent for plain DDIM inversion
    null_text: str  # the null-text embeddings' key
    control: dict[str, object]
    attention: dict[str, object]  # the attention control settings away from their defaults, and its formula
    loras: list[LoraIdentity]
    batch: int
    compile: bool
