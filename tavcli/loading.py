"""Finding and loading Stable Diffusion models: a hub id, a local diffusers folder, a single-file
checkpoint, or the built-in `tiny`.

Every model ends up as a local diffusers folder loaded through the same code: `tiny` is built once
from the configs in `tavcli/tiny/` with seeded random weights, and a single-file checkpoint is
converted once by diffusers' single-file loading; both are saved with `save_pretrained` into the
user cache and read back like any other folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tavcli.atomic import atomic_path
from tavcli.config import DEFAULT_MODEL, cache_dir
from tavcli.errors import TavError, first_line
from tavcli.hashing import files_sha256
from tavcli.hub import local_only, unreachable
from tavcli.model_name import is_single_file, model_name, parse_model_name

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "HUB_ID",
    "Components",
    "ModelSource",
    "encode_prompts",
    "load_components",
    "resolve_model",
    "quiet_libraries",
    "tiny_model",
    "weight_files",
]

TINY_MODEL = "tiny"
TINY_SEED = 0
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OFFLINE_HINT = "no model hub is reachable: use --model tiny for the built-in offline model, or a local diffusers folder"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and what identifies them (for cache keys and sidecars)."""

    name: str  # what the user asked for: a hub id, a folder, or "tiny", plus any "|lora=PATH:SCALE"
    folder: Path
    revision: str  # hub commit, or a content hash of a local folder's weights (and of its LoRAs)
    loras: tuple[tuple[Path, float], ...] = ()  # fused into the base weights when loaded, in order

    @property
    def identity(self) -> dict[str, str]:
        return {"model": self.name, "revision": self.revision}


@dataclass
class Components:
    """The loaded parts of a Stable Diffusion model (the UNet still 2D)."""

    source: ModelSource
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler


def resolve_model(name: str, allow_pickle: bool = False, note: Callable[[str], None] | None = None) -> ModelSource:
    """Turn a model name (see `tavcli.model_name`) into a local diffusers folder.

    Builds `tiny`, checks a folder, converts a single-file checkpoint once, or fetches from the
    hub. LoRAs named in `name` become part of the model's identity; `note` hears about slow steps.
    """
    spec = parse_model_name(name)
    if spec.loras:
        base = resolve_model(model_name(spec.base, spec.config), allow_pickle, note)
        hashes = []
        for path, scale in spec.loras:
            if not path.exists():
                raise TavError(f"the LoRA {path} is gone", "tune again with --lora pointing at it")
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            hashes.append(f"{scale}:{files_sha256(path.parent if path.is_file() else path, files)}")
        revision = f"{base.revision}+lora-{hashlib.sha256(','.join(hashes).encode()).hexdigest()[:16]}"
        name = model_name(base.name, loras=[f"{path}:{scale}" for path, scale in spec.loras])
        return ModelSource(name=name, folder=base.folder, revision=revision, loras=spec.loras)
    if spec.base == TINY_MODEL:
        return tiny_model()
    path = Path(spec.base).expanduser()
    if is_single_file(spec.base):
        from tavcli.single_file import single_file_model

        return single_file_model(path, spec.config, allow_pickle, note or (lambda _: None))
    if path.exists():
        return _local_model(path)
    if not HUB_ID.match(spec.base):
        raise TavError(
            f"unknown model {spec.base!r}: not a local folder or checkpoint file, nor a hub id like 'org/name'",
            f"e.g. {DEFAULT_MODEL}, a local diffusers folder, a .safetensors file, or --model tiny (built-in, offline)",
        )
    return _hub_model(spec.base, allow_pickle)


def _local_model(path: Path) -> ModelSource:
    folder = path.resolve()
    missing = [part for part in COMPONENTS if not (folder / part).is_dir()]
    if missing:
        raise TavError(f"{path} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)})")
    files = (p for part in COMPONENTS for p in (folder / part).rglob("*") if p.is_file())
    return ModelSource(name=str(folder), folder=folder, revision=f"sha256-{files_sha256(folder, files)}")


def _hub_model(repo_id: str, allow_pickle: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["model_index.json", *(f"{part}/*.json" for part in COMPONENTS), "tokenizer/*.txt"]
    patterns += [
        f"{part}/{name}" for part in ("unet", "vae", "text_encoder") for name in weight_files(part, allow_pickle)
    ]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only()))
    except RepositoryNotFoundError:
        raise TavError(f"unknown model {repo_id!r}: no such repository on the hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise unreachable(repo_id, OFFLINE_HINT) from None
    except HfHubHTTPError as error:
        raise TavError(f"cannot download {repo_id!r}: {error}", OFFLINE_HINT) from None
    return ModelSource(name=repo_id, folder=folder, revision=folder.name)


def weight_files(part: str, allow_pickle: bool = False) -> list[str]:
    """Name patterns of the weights diffusers/transformers load for `part` (whole or sharded).

    Hub repositories also hold variants (`.fp16.safetensors`, `non_ema`) that are never loaded;
    these patterns leave them out of downloads and size reports.
    """
    safe = "model" if part == "text_encoder" else "diffusion_pytorch_model"
    names = [f"{safe}.safetensors", f"{safe}-*.safetensors"]
    if allow_pickle:
        pickled = "pytorch_model" if part == "text_encoder" else "diffusion_pytorch_model"
        names += [f"{pickled}.bin", f"{pickled}-*.bin"]
    return names


def tiny_model() -> ModelSource:
    configs = resources.files("tavcli") / "tiny"
    digest = hashlib.sha256(f"seed={TINY_SEED}\n".encode())
    for entry in sorted(_walk(configs), key=str):
        digest.update(entry.read_bytes())
    revision = f"tiny-{digest.hexdigest()[:16]}"
    folder = cache_dir() / "models" / revision
    if not (folder / "model_index.json").exists():
        quiet_libraries()
        with atomic_path(folder) as temp:
            _build_tiny_model(configs, temp)
    return ModelSource(name=TINY_MODEL, folder=folder, revision=revision)


def _walk(node: Any) -> list[Any]:
    return [leaf for child in node.iterdir() for leaf in (_walk(child) if child.is_dir() else [child])]


def _build_tiny_model(configs: Any, folder: Path) -> None:
    """Save an SD-shaped model with seeded random weights; deterministic for a given config."""

    def config(name: str) -> dict[str, Any]:
        return json.loads((configs / name).read_text())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        UNet2DConditionModel(**config("unet.json")).save_pretrained(folder / "unet")
        AutoencoderKL(**config("vae.json")).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(**config("text_encoder.json"))).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**config("scheduler.json")).save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir()
    for file in (configs / "tokenizer").iterdir():
        shutil.copyfile(str(file), folder / "tokenizer" / file.name)
    # Written last: its presence marks a complete model.
    shutil.copyfile(str(configs / "model_index.json"), folder / "model_index.json")


def load_components(
    source: ModelSource, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False
) -> Components:
    """Load tokenizer, text encoder, VAE, 2D UNet and DDIM scheduler from `source.folder`.

    The text encoder and VAE are cast to `dtype` (they are frozen); the UNet stays float32 until
    the caller decides (tuning needs float32 master weights).
    """
    quiet_libraries()
    folder, safe = source.folder, (None if allow_pickle else True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=safe)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=safe)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=safe)
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
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, vae, unet, scheduler = parts
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for index, (path, scale) in enumerate(source.loras):
        try:
            pipe.load_lora_weights(str(path), adapter_name=f"lora{index}")
        except (OSError, ValueError, KeyError) as error:
            raise TavError(f"cannot load the LoRA {path}: {first_line(error)}") from None
        except ImportError:
            raise TavError("LoRAs need peft", 'pip install "tavcli[lora]"') from None
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"lora{index}"])
        pipe.unload_lora_weights()


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
