"""Single-file (original-format) Stable Diffusion checkpoints, converted once into a diffusers folder.

`--model FILE.safetensors` (or a pickle with `--trust-pickle`) is read with diffusers' single-file
loading (SD 1.x/2.x, or SDXL with its two text encoders) and saved into the user cache; after that it
loads like any folder. Its identity is the file's SHA-256 and that of the configs it was read with
(`--model-config`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from tavcli.errors import TavError, first_line, interruption
from tavcli.files.atomic import atomic_path
from tavcli.files.hashing import content_sha256, files_sha256
from tavcli.files.reading import read_json
from tavcli.models.hub import local_only
from tavcli.models.names import HUB_ID, TINY_MODEL, model_name
from tavcli.models.source import ModelSource, quiet_libraries
from tavcli.models.tiny import tiny_model
from tavcli.settings.config import cache_dir

__all__ = ["single_file_model"]

# What the original layouts name each model's text encoders (diffusers' own marks, `CHECKPOINT_KEY_NAMES`):
# SDXL base's second (OpenCLIP bigG) embedder, and the refiner's only one. diffusers' `infer_diffusers_model_type`
# wants whole tensors and a 10th text layer a narrow model lacks, so the names alone decide here.
SDXL_MARK = "conditioner.embedders.1.model.positional_embedding"
REFINER_MARK = "conditioner.embedders.0.model.text_projection"
SDXL_PIPELINE = "StableDiffusionXLPipeline"


def single_file_model(file: Path, config: str | None, allow_pickle: bool, note: Callable[[str], None]) -> ModelSource:
    """A single-file (original-format) checkpoint, converted once into a diffusers folder in the cache."""
    file = file.resolve()
    if file.suffix.lower() != ".safetensors" and not allow_pickle:
        raise TavError(
            f"{file.name} is a pickled checkpoint, and loading a pickle can run code",
            "use a .safetensors version of it, or pass --trust-pickle if you trust where it came from",
        )
    configs, config_identity = _model_configs(config)
    revision = f"file-{content_sha256(file)[:16]}"
    if config_identity:
        revision += f"-config-{hashlib.sha256(config_identity.encode()).hexdigest()[:8]}"
    folder = cache_dir() / "models" / revision
    if not (folder / "model_index.json").exists():
        # One process converts; the others wait and then read the finished folder.
        with FileLock(cache_dir() / "models" / f".{revision}.lock"):
            if not (folder / "model_index.json").exists():
                sdxl = _is_sdxl(file, configs)
                note(f"converting {file.name} into a diffusers model in {folder} (once)")
                with atomic_path(folder) as temp:
                    _convert_single_file(file, configs, sdxl, temp)
    return ModelSource(name=model_name(str(file), config), folder=folder, revision=revision)


def _model_configs(config: str | None) -> tuple[str | None, str]:
    """What diffusers reads a checkpoint's configs from, and what identifies those configs."""
    if config is None:
        return None, ""  # diffusers picks the hub repo that matches the checkpoint's architecture
    if config == TINY_MODEL:
        tiny = tiny_model()
        return str(tiny.folder), tiny.revision
    path = Path(config).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise TavError(f"--model-config {config}: no model_index.json there", "give a diffusers model folder")
        files = [f for f in path.rglob("*") if f.is_file() and f.suffix in (".json", ".txt")]
        return str(path.resolve()), f"sha256-{files_sha256(path, files)}"
    if not HUB_ID.match(config):
        raise TavError(f"--model-config {config!r} is neither a local diffusers folder nor a hub id")
    return config, config


def _is_sdxl(file: Path, configs: str | None) -> bool:
    """Whether to read `file` as SDXL: a local config folder's pipeline class says so, else the checkpoint's
    tensor names. The SDXL refiner, which tavcli cannot drive, is refused here in one line."""
    local = configs is not None and Path(configs).is_dir()
    names = _tensor_names(file, unpickle=not local)
    if REFINER_MARK in names and SDXL_MARK not in names:
        raise TavError(
            f"{file.name} is the SDXL refiner (its UNet also takes an aesthetic score): "
            "tavcli tunes and edits text-to-image SD 1.x, 2.x and SDXL models",
            "use an SDXL base checkpoint",
        )
    if configs is None or not local:
        return SDXL_MARK in names
    try:
        index = read_json(Path(configs) / "model_index.json")
    except (OSError, ValueError) as error:
        raise TavError(f"--model-config {configs}: cannot read its model_index.json: {error}") from None
    sdxl = isinstance(index, dict) and index.get("_class_name") == SDXL_PIPELINE
    if SDXL_MARK in names and not sdxl:  # SD's pipeline would read it into the configs' shapes, or fail obscurely
        raise TavError(
            f"{file.name} is an SDXL checkpoint, but --model-config {configs} is not an SDXL model",
            "pass --model-config with a local diffusers folder of SDXL base 1.0",
        )
    return sdxl


def _tensor_names(file: Path, unpickle: bool) -> set[str]:
    """The checkpoint's tensor names; none where they cannot be read (the conversion then says why), nor from a
    pickle unless `unpickle`: it has no header, so it is unpickled once for its names and again to convert."""
    from safetensors import SafetensorError, safe_open

    if file.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as opened:
                return set(opened.keys())  # the header only: no tensor is read
        except (OSError, SafetensorError):
            return set()
    if not unpickle:
        return set()
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        return set(load_single_file_checkpoint(str(file), local_files_only=True))
    except Exception as error:  # a damaged pickle can raise anything; the conversion reports it
        if interruption(error) or isinstance(error, MemoryError):
            raise
        return set()


def _convert_single_file(file: Path, configs: str | None, sdxl: bool, folder: Path) -> None:
    """Convert with diffusers' single-file loading (its SDXL pipeline for an SDXL checkpoint) and save as a
    diffusers folder.

    Each part is saved in half precision when that loses nothing (the checkpoint stored it so),
    so a 2 GB fp16 checkpoint does not become 4 GB of float32 in the cache.
    """
    quiet_libraries()
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from huggingface_hub.errors import LocalEntryNotFoundError

    kind = "Stable Diffusion XL" if sdxl else "Stable Diffusion 1.x/2.x"
    try:
        needs_hub = configs is None or not Path(configs).is_dir()
        pipe = _read_pipeline(file, configs, sdxl, local_files_only=needs_hub and local_only())
    except LocalEntryNotFoundError:
        raise TavError(
            f"cannot convert {file.name}: diffusers needs the configs of the model it was made from, "
            "and the hub is unreachable",
            "pass --model-config with a local diffusers folder of that base model (e.g. Stable Diffusion 1.5 "
            "or SDXL base 1.0), or 'tiny' for a checkpoint of the built-in tiny model",
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as error:
        raise TavError(
            f"cannot read {file.name} as a {kind} checkpoint: {first_line(error)}",
            "tav takes SD 1.x/2.x and SDXL checkpoints; check that --model-config names the model it was "
            "fine-tuned from",
        ) from None
    text_encoders = [pipe.text_encoder, *([pipe.text_encoder_2] if sdxl else [])]
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.to(_lossless_dtype(module))
    pipe.save_pretrained(folder, safe_serialization=True)


def _read_pipeline(file: Path, configs: str | None, sdxl: bool, local_files_only: bool) -> Any:
    """diffusers' pipeline read from the checkpoint: SDXL's maps its two text encoders (`conditioner.embedders`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        return StableDiffusionXLPipeline.from_single_file(
            str(file), config=configs, add_watermarker=False, local_files_only=local_files_only
        )
    return StableDiffusionPipeline.from_single_file(
        str(file),
        config=configs,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=local_files_only,
    )


def _lossless_dtype(module: torch.nn.Module) -> torch.dtype:
    """The narrowest float type that holds every one of `module`'s values exactly."""
    values = [t for t in module.state_dict().values() if t.is_floating_point()]
    for dtype in (torch.float16, torch.bfloat16):
        if all(torch.equal(t, t.to(dtype).to(t.dtype)) for t in values):
            return dtype
    return torch.float32
