"""The session: models loaded in this process (the UNet held as sampling or training needs it, tuned UNets
with their deltas or low-rank tunes folded in), and the project, tune, prompt embeddings, clip latents and
source frames a command works on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from tavcli.errors import TavError
from tavcli.media.video import read_clip
from tavcli.method.low_rank import add_low_rank_adapters, load_low_rank, merge_low_rank, temporal_init_digest
from tavcli.method.vae import decode_latents, encode_clip
from tavcli.method.video_unet import VideoUNet, inflate_unet
from tavcli.models.conditioning import SizeConditioning, pooled_width
from tavcli.models.families import require_supported
from tavcli.models.loading import encode_prompts, load_components
from tavcli.models.names import parse_model_name
from tavcli.models.resolving import resolve_model
from tavcli.models.source import Components, ModelSource
from tavcli.progress import Reporter
from tavcli.runtime import Runtime
from tavcli.settings.tuning import FrameSelection, FrameSize
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.store.specs import ClipFacts, LatentsFacts, LoraIdentity
from tavcli.workflow.keys import embeddings_entry
from tavcli.workflow.remedies import overflow_causes

__all__ = [
    "Artifact",
    "Session",
    "encode_latents",
    "prompt_embeddings",
    "recorded_frames",
    "resolve_tune",
    "size_time_ids",
    "source_frames",
]


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
        self._sources: dict[tuple[str, bool], ModelSource] = {}  # by name and whether fp16 was preferred
        self._components: dict[tuple[str, str], Components] = {}  # by resolved name (variant included) and revision
        self._tuned: dict[str, VideoUNet] = {}
        self._trains = False  # whether the session has trained: it then keeps float32 UNet weights

    def project(self, root: Path) -> Project:
        """The project at `root`, telling this session's reporter when it waits for another process."""
        project = Project(root, on_wait=self.reporter.note)
        project.check_version()
        return project

    def source(self, name: str, choose_variant: bool = False) -> ModelSource:
        """Where model `name` is (downloading it if needed), without loading it.

        With `choose_variant` (a tune choosing its model) a half-precision run (fp16 or bf16) takes the
        model's fp16 weights when it has them, as diffusers users load them; the returned name records
        the choice. A name a tune recorded is resolved as it says: no variant means the main weights,
        whatever this run's precision.
        """
        prefer_fp16 = choose_variant and self.runtime.precision != "fp32"
        if (name, prefer_fp16) not in self._sources:
            resolved = resolve_model(name, self.allow_pickle, self.reporter.note, prefer_fp16)
            require_supported(resolved.folder, parse_model_name(resolved.name).base)  # before anything loads
            self._sources[(name, prefer_fp16)] = resolved
        return self._sources[(name, prefer_fp16)]

    def model(self, name: str) -> Components:
        """Model `name`, loaded once, with every part on the device (moved back if it was offloaded).

        Its UNet is float32 as loaded, or in the run's dtype once `sampling_unet` cast it."""
        source = self.source(name)
        if source.identity_key not in self._components:
            self.reporter.note(f"loading model {source.name}")
            loaded = load_components(source, self.runtime.device, self.runtime.dtype, self.allow_pickle)
            self._components[source.identity_key] = loaded
        components = self._components[source.identity_key]
        for module in (components.vae, *components.text_encoders):
            if module.device != self.runtime.device:
                module.to(self.runtime.device)
        return components

    def model_to_train(self, name: str) -> Components:
        """Model `name` with the float32 UNet weights training needs (frozen ones included, as the reference
        computes with them): reloaded if this session cast them to sample. From then on the session keeps
        them, and the tuned UNet it held is released (training needs none; sampling builds it again)."""
        self._trains = True
        self._tuned.clear()
        source = self.source(name)
        held = self._components.get(source.identity_key)
        if held is not None and held.unet.dtype != torch.float32:  # rounded: float32 cannot be recovered
            self.reporter.note(f"reloading model {source.name} in float32 to train")
            del self._components[source.identity_key]
        return self.model(name)

    def sampling_unet(self, name: str) -> UNet2DConditionModel:
        """Model `name`'s 2D UNet with its weights held in the run's dtype, the one autocast computes in: that
        saves casting every weight at every call, and half the memory. Cast in place (so a UNet inflated from
        it shares its weights), or, in a session that trains, a copy that leaves the float32 weights to
        training. The weights, and so every result, are the same either way."""
        unet = self.model(name).unet
        if unet.dtype == self.runtime.dtype:
            return unet
        if not self._trains:
            return unet.to(self.runtime.dtype)
        with torch.device("meta"):
            held = UNet2DConditionModel.from_config(unet.config)
        cast = {key: tensor.to(self.runtime.dtype) for key, tensor in unet.state_dict().items()}
        held.load_state_dict(cast, strict=True, assign=True)
        return held.eval()

    def offload_frozen(self, name: str) -> None:
        """On a GPU, move the VAE and text encoder to the CPU while only the UNet works (tuning)."""
        if self.runtime.device.type != "cuda":
            return
        components = self.model(name)
        for module in (components.vae, *components.text_encoders):
            module.to("cpu")
        torch.cuda.empty_cache()

    def release(self, name: str) -> None:
        """Free model `name` (and UNets tuned from it) once no more work needs it."""
        freed = [self._components.pop(s.identity_key, None) for (n, _), s in self._sources.items() if n == name]
        if any(freed):
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
            self._tuned.clear()  # one tuned UNet at a time (~0.3 GB each at SD 1.5 size): previews and jobs move on
            spec, held = tune_entry.spec, self.sampling_unet(meta["model"]["model"])
            time_ids = size_time_ids(self, meta["clip"], held)
            unet = inflate_unet(held, frame_norm=spec["frame_norm"], seed=spec.get("seed"), time_ids=time_ids)
            delta = tune_entry.tensors(self.runtime.device)
            if spec.get("rank"):
                _apply_low_rank(unet, delta, spec["rank"], meta.get("temporal_init"), tune_entry.path)
            elif unet.load_state_dict(delta, strict=False).unexpected_keys:
                raise TavError(f"tuned delta {tune_entry.path} does not fit this model", "run `tav tune` again")
            unet.to(held.dtype)  # the temporal layers, created and tuned in float32
            self._tuned[tune_entry.key] = self.runtime.prepare(unet.eval())  # type: ignore[assignment]
        return components, self._tuned[tune_entry.key]


def _apply_low_rank(
    unet: VideoUNet, tensors: dict[str, torch.Tensor], rank: int, digest: str | None, path: Path
) -> None:
    """Fold a low-rank tune into `unet`, inflated with the tune's seed: its temporal layers must start where the
    tune's did (they are re-created, not stored), which the digest recorded at tuning time checks."""
    if digest != temporal_init_digest(unet):
        raise TavError(
            f"the low-rank tune {path} cannot be rebuilt here: its temporal layers start from weights this "
            "torch version does not re-create from its seed",
            "tune again with this installation",
        )
    add_low_rank_adapters(unet, rank)
    try:
        load_low_rank(unet, tensors)
    except ValueError as error:
        raise TavError(f"{path}: {error}", "run `tav tune` again") from None
    merge_low_rank(unet)


def prompt_embeddings(
    session: Session,
    project: Project,
    source: ModelSource,
    prompts: list[str],
    loras: list[LoraIdentity] | None = None,
) -> torch.Tensor:
    """Text embeddings of `prompts` (stacked; SDXL's with its pooled row), computed once per model, precision and
    prompts. `loras` identifies edit-time LoRAs the text encoders carry now (`tavcli.models.lora.applied_loras`)."""
    entry = embeddings_entry(project, source, prompts, session.runtime.precision, loras)

    def compute() -> None:
        components = session.model(source.name)
        limit = components.tokenizer.model_max_length
        for prompt in prompts:
            count = len(components.tokenizer(prompt).input_ids)
            if count > limit:
                session.reporter.note(f"prompt is {count} tokens; the text encoder reads the first {limit}: {prompt!r}")
        embeddings = encode_prompts(components, prompts).float()
        entry.save({"embeddings": embeddings}, {}, causes=overflow_causes(session.runtime.precision, loras))

    project.produce(entry, compute)
    embeddings: torch.Tensor = entry.tensors(session.runtime.device)["embeddings"]
    return embeddings


def encode_latents(
    session: Session,
    project: Project,
    entry: Entry,
    model: str,
    clip: Path,
    selection: FrameSelection,
    size: FrameSize,
    force: bool = False,
) -> Artifact:
    """The clip's VAE posterior (mean, std) in `entry`: encoded once per model, clip content, frames and size."""
    started = time.perf_counter()

    def compute() -> None:
        frames = read_clip(clip, selection, size)
        vae = session.model(model).vae  # loaded before the progress bar starts
        with session.reporter.task("encoding clip", 1) as advance:
            mean, std = encode_clip(vae, frames.frames)
            advance()
        facts: LatentsFacts = {
            "clip": {
                "path": str(clip.resolve()),
                "fps": str(frames.fps),
                "frames": selection.frames,
                "stride": selection.stride,
                "start": selection.start,
                "width": size.width,
                "height": size.height,
                "resize": size.resize,
                "size_conditioning": [*frames.original, *frames.crop_top_left, size.height, size.width],
            }
        }
        entry.save({"mean": mean, "std": std}, facts)

    cached = project.produce(entry, compute, force)
    return Artifact("latents", entry.key, entry.path, cached, time.perf_counter() - started)


def size_time_ids(session: Session, clip: ClipFacts, model: Any) -> torch.Tensor | None:
    """SDXL's size numbers for a clip (its latents entry recorded them), for `model` (a UNet or a ControlNet):
    None for one that takes none (SD 1.x/2.x, a T2I-Adapter). They are rounded to the run's precision, as
    diffusers' pipeline and SDXL training script make them (in the text's dtype: under bf16, 854 is 856)."""
    if pooled_width(model.config) is None:
        return None
    recorded = clip.get("size_conditioning")
    if recorded is None:
        raise TavError(
            f"the clip {clip['path']} was encoded before tavcli recorded SDXL's size numbers",
            "tune again with --force",
        )
    return SizeConditioning.of(recorded).time_ids().to(session.runtime.dtype).float()


def recorded_frames(clip: ClipFacts) -> tuple[FrameSelection, FrameSize]:
    """The selection and size of a latents entry's clip facts (as `encode_latents` records them)."""
    selection = FrameSelection(frames=clip["frames"], stride=clip["stride"], start=clip["start"])
    return selection, FrameSize(width=clip["width"], height=clip["height"], resize=clip["resize"])


def source_frames(session: Session, latents: Entry, clip: ClipFacts) -> np.ndarray:
    """The frames of a latents entry (`clip`: its facts): from the clip if it is still there, else decoded."""
    path = Path(clip["path"])
    if path.is_file():
        return read_clip(path, *recorded_frames(clip)).frames
    vae = session.model(latents.spec["model"]["model"]).vae
    mean = latents.tensors(session.runtime.device)["mean"]
    return decode_latents(vae, mean * vae.config.scaling_factor)


def resolve_tune(session: Session, project_root: Path, tune_key: str | None) -> tuple[Project, Entry]:
    """Tune `tune_key`, or the project's current one."""
    if not project_root.is_dir():
        raise TavError(f"no project at {project_root}", "`tav tune CLIP PROMPT` creates one")
    project = session.project(project_root)
    return project, project.find("tunes", tune_key or project.current_tune())


def _check_same_model(source: ModelSource, tuned_with: dict[str, str]) -> None:
    if source.revision != tuned_with["revision"]:
        raise TavError(
            f"model {source.name} has changed since this project was tuned "
            f"({tuned_with['revision']} then, {source.revision} now)",
            "tune again with `tav tune`",
        )
