"""The built-in `tiny` model: SD-shaped, random weights, built offline from the configs in `tavcli/tiny/`.

It is built once with seeded random weights, saved with `save_pretrained` into the user cache, and
loaded back through the same code as any model; its identity is a hash of the configs and the seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tavcli.files.atomic import atomic_path
from tavcli.models.architectures import TINY_CONFIGS, save_random_model
from tavcli.models.names import TINY_MODEL
from tavcli.models.source import ModelSource
from tavcli.settings.config import cache_dir

__all__ = ["tiny_model"]


TINY_SEED = 0
PARTS = ("unet", "vae", "text_encoder", "scheduler")  # tavcli/tiny/PART.json


def tiny_model() -> ModelSource:
    configs = TINY_CONFIGS
    digest = hashlib.sha256(f"seed={TINY_SEED}\n".encode())
    for entry in sorted(_walk(configs), key=str):
        digest.update(entry.read_bytes())
    revision = f"tiny-{digest.hexdigest()[:16]}"
    folder = cache_dir() / "models" / revision
    if not (folder / "model_index.json").exists():
        with atomic_path(folder) as temp:
            _build_tiny_model(configs, temp)
    return ModelSource(name=TINY_MODEL, folder=folder, revision=revision)


def _walk(node: Any) -> list[Any]:
    return [leaf for child in node.iterdir() for leaf in (_walk(child) if child.is_dir() else [child])]


def _build_tiny_model(configs: Any, folder: Path) -> None:
    """Save an SD-shaped model with seeded random weights; deterministic for a given config."""
    parts = {part: json.loads((configs / f"{part}.json").read_text()) for part in PARTS}
    save_random_model(folder, parts, TINY_SEED)
