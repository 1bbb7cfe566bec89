"""The built-in `tiny` model: SD-shaped, random weights, built offline from the configs in `tavcli/tiny/`.

It is built once with seeded random weights, saved with `save_pretrained` into the user cache, and
loaded back through the same code as any model; its identity is a hash of the configs and the seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tavcli.atomic import atomic_path
from tavcli.config import cache_dir
from tavcli.loading import ModelSource, quiet_libraries
from tavcli.model_name import TINY_MODEL

__all__ = ["tiny_model"]


TINY_SEED = 0


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
