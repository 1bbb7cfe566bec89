"""Finding a Stable Diffusion model: a hub id, a local diffusers folder, a single-file checkpoint, or the
built-in `tiny`, each turned into a local diffusers folder and the identity of its weights; the weights
variant it loads (`variant_of`) and the weight files of each part (`weight_files`, `COMPONENTS`).

`tiny` is built once from the configs in `tavcli/tiny/` with seeded random weights, and a single-file
checkpoint is converted once by diffusers' single-file loading; both are saved with `save_pretrained`
into the user cache and read back like any other folder (`tavcli.models.loading`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tavcli.errors import TavError, first_line
from tavcli.files.hashing import files_sha256, lora_file
from tavcli.models.hub import local_only, unreachable
from tavcli.models.names import HUB_ID, NO_VARIANT, TINY_MODEL, ModelSpec, is_single_file, parse_model_name
from tavcli.models.single_file import single_file_model
from tavcli.models.source import ModelSource
from tavcli.models.tiny import tiny_model
from tavcli.settings.config import DEFAULT_MODEL

__all__ = ["COMPONENTS", "OFFLINE_HINT", "resolve_model", "variant_of", "weight_files"]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # beside those, in an SDXL folder


WEIGHTED = ("unet", "vae", "text_encoder")  # the parts with weights (and weight variants)


OFFLINE_HINT = "no model hub is reachable: use --model tiny for the built-in offline model, or a local diffusers folder"


def resolve_model(
    name: str, allow_pickle: bool = False, note: Callable[[str], None] | None = None, prefer_fp16: bool = False
) -> ModelSource:
    """Turn a model name (see `tavcli.models.names`) into a local diffusers folder.

    Builds `tiny`, checks a folder, converts a single-file checkpoint once, or fetches from the
    hub. LoRAs named in `name` become part of the model's identity; `note` hears about slow steps.
    With `prefer_fp16` (a tune choosing its model for a half-precision run) the fp16 weights variant is
    chosen when the model has one and no variant was asked for; the returned name records it, so
    edits load it too. A name without a variant loads the main weights.
    """
    spec = parse_model_name(name)
    if spec.vae is not None:  # the base model, then its VAE swapped: part of the identity
        plain = ModelSpec(spec.base, spec.config, spec.loras, spec.revision, spec.variant)
        base = resolve_model(plain.name, allow_pickle, note, prefer_fp16)
        vae = Path(spec.vae)
        if not vae.exists():
            raise TavError(f"the VAE {vae} is gone", "tune again with --vae pointing at it")
        files = [f for f in vae.rglob("*") if f.is_file()] if vae.is_dir() else [vae]
        revision = f"{base.revision}+vae-{files_sha256(vae if vae.is_dir() else vae.parent, files)[:16]}"
        chosen = parse_model_name(base.name)
        name = ModelSpec(chosen.base, chosen.config, chosen.loras, chosen.revision, chosen.variant, spec.vae).name
        return ModelSource(name=name, folder=base.folder, revision=revision, loras=base.loras, vae=vae)
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
        if spec.variant not in (None, NO_VARIANT):
            raise TavError(f"the built-in tiny model has no {spec.variant} weights", "drop --variant")
        return tiny_model()
    path = Path(spec.base).expanduser()
    if is_single_file(spec.base):
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
    files = (p for part in (*COMPONENTS, *SDXL_COMPONENTS) for p in (folder / part).rglob("*") if p.is_file())
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
        parts = (*COMPONENTS, *SDXL_COMPONENTS)  # patterns matching nothing fetch nothing
        patterns = ["model_index.json", *(f"{part}/*.json" for part in parts), "tokenizer*/*.txt"]
        weighted = (*WEIGHTED, "text_encoder_2")
        patterns += [f"{part}/{name}" for part in weighted for name in weight_files(part, allow_pickle, variant)]
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
    """Whether every weighted part of a model folder (SDXL's second text encoder too) has `variant` weights."""
    parts = (*WEIGHTED, *(["text_encoder_2"] if (folder / "text_encoder_2").is_dir() else []))
    return all(any(any((folder / part).glob(name)) for name in weight_files(part, False, variant)) for part in parts)


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
    text = part.startswith("text_encoder")
    safe = "model" if text else "diffusion_pytorch_model"
    pickled = "pytorch_model" if text else "diffusion_pytorch_model"
    kinds = [(safe, "safetensors"), *([(pickled, "bin")] if allow_pickle else [])]
    infix = f".{variant}" if variant else ""
    return [f"{stem}{infix}{shard}.{suffix}" for stem, suffix in kinds for shard in ("", "-*")]
