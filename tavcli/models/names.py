"""The model name a tune records: `BASE[|revision=REV][|variant=V][|config=CONFIG][|vae=VAE][|lora=PATH:SCALE]...`.

`--model`, `--revision`, `--variant`, `--model-config`, `--vae` and each `--lora` fold into one string,
stored in the tune, so that `tav edit` loads exactly the model the tune was trained on (a variant
chosen when loading is folded in too). This module imports no torch, so batch files are checked
quickly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tavcli.errors import TavError
from tavcli.settings.inputs import require_regular_file
from tavcli.settings.option import OptionError

__all__ = [
    "HUB_ID",
    "NO_VARIANT",
    "SINGLE_FILE_SUFFIXES",
    "TINY_MODEL",
    "ModelSpec",
    "is_single_file",
    "lora_path",
    "model_name",
    "parse_model_name",
    "split_lora",
    "vae_path",
]

CONFIG_MARK = "|config="
LORA_MARK = "|lora="
MARKS = ("revision", "variant", "config", "vae")  # `|KEY=VALUE` after the base, in this order, then the LoRAs
# Single-file checkpoints by suffix; all but .safetensors are pickles (loading one can run code).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TINY_MODEL = "tiny"  # the built-in offline model (tavcli.models.tiny)
NO_VARIANT = "none"  # --variant none: the main weights, even for a half-precision run


@dataclass(frozen=True)
class ModelSpec:
    base: str  # hub id, folder, single file or "tiny"
    config: str | None = None  # diffusers configs for a single-file checkpoint: hub id, folder or "tiny"
    loras: tuple[tuple[Path, float], ...] = ()  # fused into the base weights, in order
    revision: str | None = None  # a hub model's branch, tag or commit
    variant: str | None = None  # weights variant ("fp16"), NO_VARIANT, or None: decided when loading
    vae: str | None = None  # a VAE folder or .safetensors file loaded instead of the model's own

    @property
    def name(self) -> str:
        """The one string that names this model in tunes and sidecars."""
        marks = "".join(f"|{key}={getattr(self, key)}" for key in MARKS if getattr(self, key) is not None)
        return self.base + marks + "".join(f"{LORA_MARK}{path}:{scale}" for path, scale in self.loras)


def is_single_file(base: str) -> bool:
    """Whether `--model` names a single-file checkpoint (a file with a checkpoint suffix)."""
    path = Path(base).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def split_lora(given: str, named: str = "--lora") -> tuple[str, float]:
    """`PATH` or `PATH:SCALE` as (path, scale); the scale defaults to 1. A NaN or infinite scale is refused:
    it would only show as NaN weights after the model is loaded. `named` is how messages name the option.

    The rule is the text's alone, never the file system's: what follows the last colon, if it reads as a
    number, is the scale. So a file named `a:0.5` is written `a:0.5:1` (`a:0.5` is `a` at scale 0.5).
    """
    path, _, scale = given.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        return given, 1.0
    if not path:
        return given, 1.0
    if not math.isfinite(value):
        raise OptionError(f"{named} {given}: the scale must be a finite number, not {scale}")
    return path, value


def lora_path(given: str, named: str = "--lora", base: Path | None = None) -> tuple[Path, float]:
    """`PATH[:SCALE]` (see `split_lora`) as an existing LoRA file or folder and its scale; a relative path
    is taken from `base` (default: the current folder), with `..` folded and links kept."""
    path, scale = split_lora(given, named)
    if not path.strip():
        raise OptionError(f"{named} is empty", "give a LoRA .safetensors file or folder, optionally :SCALE")
    file = Path(os.path.abspath((base or Path.cwd()) / Path(path).expanduser()))
    if not file.exists():
        whole = Path(os.path.abspath((base or Path.cwd()) / Path(given).expanduser()))
        hint = f"{named} takes a .safetensors file or folder, optionally :SCALE"
        if path != given and whole.exists():  # the user meant the file whose name ends in `:NUMBER`
            hint = f"{named} {given} reads as {path} at scale {scale:g}; for the file {given}, write {given}:1"
        raise TavError(f"no LoRA at {file}", hint)
    if not file.is_dir():  # a FIFO or a device would block or never end when hashed and loaded
        require_regular_file(file, "LoRA file", f"{named} takes a .safetensors file or folder")
    return file, scale


def model_name(
    base: str,
    config: str | None = None,
    loras: Sequence[str] = (),
    default_config: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
) -> str:
    """The name that carries `--model-config`, `--lora PATH[:SCALE]`, `--revision`, `--variant` and `--vae` with
    `--model`.

    `config` was asked for (an error for a model that is no single file); `default_config` comes
    from settings and only concerns single files.
    """
    config = config or (default_config if is_single_file(base) else None)
    if config and not is_single_file(base):
        raise TavError(
            f"a model config only applies to single-file checkpoints, and {base!r} is not one",
            "drop --model-config (or model_config), or point --model at a .safetensors file",
        )
    if revision and (not HUB_ID.match(base) or Path(base).expanduser().exists()):
        raise TavError(f"--revision only applies to hub models, and {base!r} is not one", "drop --revision")
    if variant and is_single_file(base):
        raise TavError("--variant applies to diffusers models, not to single-file checkpoints", "drop --variant")
    if config:
        folder = Path(config).expanduser()
        config = str(folder.resolve()) if folder.is_dir() else config
    fused = []
    for given in loras:
        file, scale = lora_path(given)
        fused.append((file.resolve(), scale))
    vae = str(vae_path(vae)) if vae else None
    return ModelSpec(base, config or None, tuple(fused), revision or None, variant or None, vae).name


def vae_path(given: str) -> Path:
    """`--vae`: a diffusers VAE folder (with its config.json) or a .safetensors file, made absolute."""
    path = Path(given).expanduser().resolve()
    hint = "give a diffusers VAE folder (config.json and weights) or a VAE .safetensors file"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TavError(f"--vae {given}: no config.json in that folder", hint)
        return path
    if not path.exists():
        raise TavError(f"--vae {given}: no such folder or file", hint)
    require_regular_file(path, "VAE file", hint)
    if path.suffix.lower() != ".safetensors":
        raise TavError(f"--vae {given}: not a .safetensors file", hint)
    return path


def parse_model_name(name: str) -> ModelSpec:
    """The parts of a name made by `model_name` (or `ModelSpec.name`)."""
    head, *loras = name.split(LORA_MARK)
    base, *marks = head.split("|")
    fields = dict(mark.partition("=")[::2] for mark in marks)
    fused = tuple((Path(path), scale) for path, scale in map(split_lora, loras))
    return ModelSpec(
        base, fields.get("config"), fused, fields.get("revision"), fields.get("variant"), fields.get("vae")
    )
