"""The model name a tune records: `BASE[|config=CONFIG][|lora=PATH:SCALE]...`.

`--model`, `--model-config` and each `--lora` fold into one string, stored in the tune, so that
`tav edit` loads exactly the model the tune was trained on. This module imports no torch, so batch
files are checked quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tavcli.errors import TavError

__all__ = ["SINGLE_FILE_SUFFIXES", "ModelSpec", "is_single_file", "model_name", "parse_model_name", "split_lora"]

CONFIG_MARK = "|config="
LORA_MARK = "|lora="
# Single-file checkpoints by suffix; all but .safetensors are pickles (loading one can run code).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    base: str  # hub id, folder, single file or "tiny"
    config: str | None  # diffusers configs for a single-file checkpoint: hub id, folder or "tiny"
    loras: tuple[tuple[Path, float], ...]  # fused into the base weights, in order


def is_single_file(base: str) -> bool:
    """Whether `--model` names a single-file checkpoint (a file with a checkpoint suffix)."""
    path = Path(base).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def split_lora(given: str) -> tuple[str, float]:
    """`PATH` or `PATH:SCALE` as (path, scale); the scale defaults to 1."""
    path, _, scale = given.rpartition(":")
    try:
        return (path, float(scale)) if path else (given, 1.0)
    except ValueError:
        return given, 1.0


def model_name(
    base: str, config: str | None = None, loras: Sequence[str] = (), default_config: str | None = None
) -> str:
    """The name that carries `--model-config` and `--lora PATH[:SCALE]` options along with `--model`.

    `config` was asked for (an error for a model that is no single file); `default_config` comes
    from settings and only concerns single files.
    """
    name = base
    config = config or (default_config if is_single_file(base) else None)
    if config:
        if not is_single_file(base):
            raise TavError(
                f"a model config only applies to single-file checkpoints, and {base!r} is not one",
                "drop --model-config (or model_config), or point --model at a .safetensors file",
            )
        folder = Path(config).expanduser()
        name += CONFIG_MARK + (str(folder.resolve()) if folder.is_dir() else config)
    for given in loras:
        path, scale = split_lora(given)
        file = Path(path).expanduser()
        if not file.exists():
            raise TavError(f"no LoRA at {file}", "--lora takes a .safetensors file or folder, optionally :SCALE")
        name += f"{LORA_MARK}{file.resolve()}:{scale}"
    return name


def parse_model_name(name: str) -> ModelSpec:
    """The parts of a name made by `model_name`."""
    head, *loras = name.split(LORA_MARK)
    base, _, config = head.partition(CONFIG_MARK)
    fused = tuple((Path(path), scale) for path, scale in map(split_lora, loras))
    return ModelSpec(base=base, config=config or None, loras=fused)
