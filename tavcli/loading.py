"""Finding and loading Stable Diffusion models: a hub id, a local diffusers folder, a single-file
checkpoint, or the built-in `tiny`.

Every model ends up as a local diffusers folder loaded through the same code: `tiny` is built once
from the configs in `tavcli/tiny/` with seeded random weights, and a single-file checkpoint is
converted once by diffusers' single-file loading; both are saved with `save_pretrained` into the
user cache and read back like any other folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tavcli.config import DEFAULT_MODEL
from tavcli.errors import TavError, first_line, interruption
from tavcli.hashing import files_sha256, lora_file
from tavcli.hub import local_only, unreachable
from tavcli.inputs import require_regular_file
from tavcli.model_name import HUB_ID, NO_VARIANT, TINY_MODEL, ModelSpec, is_single_file, parse_model_name

__all__ = [
    "Components",
    "ModelSource",
    "encode_prompts",
    "load_components",
    "load_lora",
    "lora_base_guess",
    "lora_loader",
    "resolve_model",
    "variant_of",
    "quiet_libraries",
    "weight_files",
]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")  # the parts with weights (and weight variants)
OFFLINE_HINT = "no model hub is reachable: use --model tiny for the built-in offline model, or a local diffusers folder"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and what identifies them (for cache keys and sidecars)."""

    name: str  # the model's name (tavcli.model_name): base, revision and variant loaded, configs, LoRAs
    folder: Path
    revision: str  # hub commit, or a content hash of a local folder's weights (and of its LoRAs)
    loras: tuple[tuple[Path, float], ...] = ()  # fused into the base weights when loaded, in order

    @property
    def identity(self) -> dict[str, str]:
        return {"model": self.name, "revision": self.revision}

    @property
    def identity_key(self) -> tuple[str, str]:
        """What tells loaded weights apart: the name (with its variant and LoRAs) and the revision."""
        return self.name, self.revision


@dataclass
class Components:
    """The loaded parts of a Stable Diffusion model (the UNet still 2D)."""

    source: ModelSource
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler


def resolve_model(
    name: str, allow_pickle: bool = False, note: Callable[[str], None] | None = None, prefer_fp16: bool = False
) -> ModelSource:
    """Turn a model name (see `tavcli.model_name`) into a local diffusers folder.

    Builds `tiny`, checks a folder, converts a single-file checkpoint once, or fetches from the
    hub. LoRAs named in `name` become part of the model's identity; `note` hears about slow steps.
    With `prefer_fp16` (a tune choosing its model for a half-precision run) the fp16 weights variant is
    chosen when the model has one and no variant was asked for; the returned name records it, so
    edits load it too. A name without a variant loads the main weights.
    """
    spec = parse_model_name(name)
    if spec.loras:
        plain = ModelSpec(spec.base, spec.config, (), spec.revision, spec.variant)
        base = resolve_model(plain.name, allow_pickle, note, prefer_fp16)
        hashes = []
        for path, scale in spec.loras:
            if not path.exists():
                raise TavError(f"the LoRA {path} is gone", "tune again with --lora pointing at it")
            weights = lora_file(path)  # as a file or as its folder, the same LoRA
            hashes.append(f"{scale}:{files_sha256(weights.parent, [weights])}")  # its name too, as tunes always had
        revision = f"{base.revision}+lora-{hashlib.sha256(','.join(hashes).encode()).hexdigest()[:16]}"
        chosen = parse_model_name(base.name)
        name = ModelSpec(chosen.base, chosen.config, spec.loras, chosen.revision, chosen.variant).name
        return ModelSource(name=name, folder=base.folder, revision=revision, loras=spec.loras)
    if spec.base == TINY_MODEL:
        from tavcli.tiny_model import tiny_model

        if spec.variant not in (None, NO_VARIANT):
            raise TavError(f"the built-in tiny model has no {spec.variant} weights", "drop --variant")
        return tiny_model()
    path = Path(spec.base).expanduser()
    if is_single_file(spec.base):
        from tavcli.single_file import single_file_model

        return single_file_model(path, spec.config, allow_pickle, note or (lambda _: None))
    if path.exists():
        return _local_model(path, spec.variant, prefer_fp16)
    if not HUB_ID.match(spec.base):
        raise TavError(
            f"unknown model {spec.base!r}: not a local folder or checkpoint file, nor a hub id like 'org/name'",
            f"e.g. {DEFAULT_MODEL}, a local diffusers folder, a .safetensors file, or --model tiny (built-in, offline)",
        )
    return _hub_model(spec, allow_pickle, prefer_fp16)


def _local_model(path: Path, variant: str | None, prefer_fp16: bool) -> ModelSource:
    folder = path.resolve()
    missing = [part for part in COMPONENTS if not (folder / part).is_dir()]
    if missing:
        raise TavError(f"{path} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)})")
    chosen = _variant(str(path), variant, prefer_fp16, lambda wanted: _has_weights(folder, wanted))
    files = (p for part in COMPONENTS for p in (folder / part).rglob("*") if p.is_file())
    name = ModelSpec(str(folder), variant=chosen).name
    return ModelSource(name=name, folder=folder, revision=f"sha256-{files_sha256(folder, files)}")


def _hub_model(spec: ModelSpec, allow_pickle: bool, prefer_fp16: bool) -> ModelSource:
    """A hub model at `spec.revision` (default: main), with only the weights of the variant loaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(variant: str | None) -> Path:
        patterns = ["model_index.json", *(f"{part}/*.json" for part in COMPONENTS), "tokenizer/*.txt"]
        patterns += [f"{part}/{name}" for part in WEIGHTED for name in weight_files(part, allow_pickle, variant)]
        offline = local_only()
        return Path(
            snapshot_download(spec.base, revision=spec.revision, allow_patterns=patterns, local_files_only=offline)
        )

    try:
        chosen = _variant(spec.base, spec.variant, prefer_fp16, lambda wanted: _has_weights(fetch(wanted), wanted))
        folder = fetch(None if chosen in (None, NO_VARIANT) else chosen)
    except RevisionNotFoundError:
        raise TavError(f"{spec.base!r} has no revision {spec.revision!r}", "give a branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise TavError(f"unknown model {spec.base!r}: no such repository on the hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise unreachable(spec.base, OFFLINE_HINT) from None
    except HfHubHTTPError as error:
        raise TavError(f"cannot download {spec.base!r}: {first_line(error)}", OFFLINE_HINT) from None
    name = ModelSpec(spec.base, revision=spec.revision, variant=chosen).name
    return ModelSource(name=name, folder=folder, revision=folder.name)


def _variant(model: str, asked: str | None, prefer_fp16: bool, available: Callable[[str], bool]) -> str | None:
    """The weights variant to load: the one asked for (refused if the model lacks it), else fp16 when
    preferred and the model has it, else the main weights (None)."""
    if asked == NO_VARIANT:
        return asked
    if asked is not None:
        if not available(asked):
            raise TavError(f"{model} has no {asked} weights (no {asked} variant files)", "drop --variant")
        return asked
    return "fp16" if prefer_fp16 and available("fp16") else None


def _has_weights(folder: Path, variant: str) -> bool:
    """Whether every weighted part of a model folder has `variant` weights."""
    return all(any(any((folder / part).glob(name)) for name in weight_files(part, False, variant)) for part in WEIGHTED)


def variant_of(source: ModelSource) -> str | None:
    """The weights variant a resolved model loads (None: the main weights)."""
    variant = parse_model_name(source.name).variant
    return None if variant in (None, NO_VARIANT) else variant


def weight_files(part: str, allow_pickle: bool = False, variant: str | None = None) -> list[str]:
    """Name patterns of the weights diffusers/transformers load for `part` (whole or sharded): the main
    weights, or those of a `variant` (`diffusion_pytorch_model.fp16.safetensors`).

    Hub repositories hold several variants (`.fp16`, `non_ema`); these patterns download and count
    only those that are loaded.
    """
    safe = "model" if part == "text_encoder" else "diffusion_pytorch_model"
    pickled = "pytorch_model" if part == "text_encoder" else "diffusion_pytorch_model"
    kinds = [(safe, "safetensors"), *([(pickled, "bin")] if allow_pickle else [])]
    infix = f".{variant}" if variant else ""
    return [f"{stem}{infix}{shard}.{suffix}" for stem, suffix in kinds for shard in ("", "-*")]


def load_components(
    source: ModelSource, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False
) -> Components:
    """Load tokenizer, text encoder, VAE, 2D UNet and DDIM scheduler from `source.folder`.

    The text encoder and VAE are cast to `dtype` (they are frozen); the UNet stays float32 until
    the caller decides (tuning needs float32 master weights).
    """
    quiet_libraries()
    folder, safe, variant = source.folder, (None if allow_pickle else True), variant_of(source)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=safe, variant=variant)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=safe, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=safe, variant=variant)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError) as error:
        hint = None if allow_pickle else "if it has only pickled (.bin) weights and you trust it, pass --trust-pickle"
        raise TavError(f"cannot load the model in {folder}: {first_line(error)}", hint) from None
    if not any(name.endswith("attn2") for name, _ in unet.named_modules()):
        raise TavError(
            f"the UNet in {folder / 'unet'} has no cross-attention blocks: it is not a text-to-image UNet",
            "use a Stable Diffusion 1.x/2.x model",
        )
    if source.loras:
        _fuse_loras(source, tokenizer, text_encoder, vae, unet, scheduler)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    text_encoder.to(device=device, dtype=dtype)
    vae.to(device=device, dtype=dtype)
    unet.to(device=device)
    return Components(source, tokenizer, text_encoder, vae, unet, scheduler)


def _fuse_loras(source: ModelSource, *parts: Any) -> None:
    """Fuse each LoRA into the UNet and text encoder weights with diffusers' LoRA loading (needs peft)."""
    pipe = lora_loader(*parts)
    for index, (path, scale) in enumerate(source.loras):
        load_lora(pipe, path, f"lora{index}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"lora{index}"])
        pipe.unload_lora_weights()


def lora_loader(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, scheduler: Any) -> Any:
    """A pipeline made only to load LoRAs: diffusers' LoRA loading maps a file's keys onto these modules."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_lora(pipe: Any, path: Path, adapter_name: str) -> None:
    """Load one LoRA (file or folder) onto `lora_loader`'s modules as an unfused peft adapter.

    The file is the user's: whatever diffusers, peft or safetensors raise on it becomes one line
    (diffusers takes a failed adapter off again itself).
    """
    weights = _lora_weights(path)
    try:
        pipe.load_lora_weights(str(path), weight_name=weights, adapter_name=adapter_name)
    except ImportError:
        raise TavError("LoRAs need peft", 'pip install "tavcli[lora]"') from None
    except Exception as error:
        if interruption(error) or isinstance(error, torch.OutOfMemoryError):
            raise  # not the file's fault: the command line reports these
        if "size mismatch for" not in str(error):
            raise TavError(f"cannot load the LoRA {path}: {first_line(error)}") from None
        raise TavError(
            f"the LoRA {path} does not fit this model: its tensor shapes are another model's"
            + lora_base_guess(_lora_keys(path, weights), str(error)),
            _lora_hint(pipe),
        ) from None
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        # diffusers only warns when no key names a part of this model: the LoRA would change nothing
        raise TavError(
            f"the LoRA {path} adapts nothing in this model: none of its keys name one of its layers"
            + lora_base_guess(_lora_keys(path, weights), ""),
            _lora_hint(pipe),
        )


def _lora_weights(path: Path) -> str | None:
    """The weights file diffusers is to load from a LoRA folder, the one its identity hashes (`lora_file`);
    None for a file, or a folder of `.bin` weights, which diffusers searches itself. Only regular files
    are opened."""
    hint = "give a LoRA .safetensors file, or the folder that holds it"
    if not path.is_dir():
        require_regular_file(path, "LoRA file", hint)
        return None
    chosen = lora_file(path)
    require_regular_file(chosen, "LoRA file", hint)
    return chosen.name if chosen.suffix == ".safetensors" else None


# What the width of the text that cross-attention reads says of the base a LoRA was trained on.
CROSS_ATTENTION_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
SDXL_KEYS = ("text_encoder_2", "lora_te2_", "add_embedding", "conditioner.embedders")  # parts only SDXL has
MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def lora_base_guess(keys: list[str], mismatches: str) -> str:
    """What a LoRA's keys and torch's size-mismatch lines tell of the base it was made for, as a clause
    to end a message with; empty when they do not tell (a guess is said only where the evidence is plain)."""
    marks = [mark for mark in SDXL_KEYS if any(mark in key for key in keys)]
    if marks:
        return f"; it was made for SDXL, by its {marks[0]} keys"
    for name, given, here in MISMATCH.findall(mismatches):
        # a LoRA's down projection of attn2's key or value takes the text embeddings: its width is theirs
        if ".attn2.to_k.lora_A." not in name and ".attn2.to_v.lora_A." not in name:
            continue
        width, own = int(given.split(",")[-1]), int(here.split(",")[-1])
        base = CROSS_ATTENTION_BASES.get(width)
        if base is None:
            return f"; its cross-attention is {width}-wide, this model's {own}-wide"
        return f"; it was made for {base}, by its {width}-wide cross-attention (this model's is {own}-wide)"
    return ""


def _lora_keys(path: Path, weights: str | None) -> list[str]:
    """The tensor names of the LoRA file loaded (`_lora_weights`), read from its header (none when unknown)."""
    from safetensors import SafetensorError, safe_open

    file = path / weights if weights else path
    if not file.is_file():
        return []  # a folder diffusers searched itself
    try:
        with safe_open(str(file), framework="pt") as opened:
            return list(opened.keys())
    except (OSError, SafetensorError):
        return []


def _lora_hint(pipe: Any) -> str:
    """Which LoRAs would fit: those of this model's base, named where its text width tells it."""
    width = getattr(pipe.unet.config, "cross_attention_dim", None)
    base = CROSS_ATTENTION_BASES.get(width) if isinstance(width, int) else None
    return f"use a LoRA made for {base} models" if base else "use a LoRA made for this model's base"


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), n, d) CLIP text embeddings, padded to the tokenizer's full length."""
    tokens = components.tokenizer(
        prompts,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return components.text_encoder(tokens.input_ids.to(components.text_encoder.device))[0]


def quiet_libraries() -> None:
    """tavcli draws its own progress and reports load failures itself: silence the libraries' bars and logs."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity(logging.CRITICAL)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
