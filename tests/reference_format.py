"""The folder the reference Tune-A-Video training script writes, for `tav import` tests (cf. ldm_format.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_reference_output(
    path: Path, weights: dict[str, torch.Tensor], unet_config: dict[str, Any], config_yaml: str, pickled: bool = False
) -> Path:
    """`unet/` with the whole video UNet (weights and the 2D config as a `UNet3DConditionModel`), and
    the run's `config.yaml`; the weights as a pickle (`.bin`) when `pickled`."""
    (path / "unet").mkdir(parents=True)
    config = unet_config | {"_class_name": "UNet3DConditionModel"}
    (path / "unet" / "config.json").write_text(json.dumps(config))
    if pickled:
        torch.save(weights, path / "unet" / "diffusion_pytorch_model.bin")
    else:
        save_file(weights, path / "unet" / "diffusion_pytorch_model.safetensors")
    (path / "config.yaml").write_text(config_yaml)
    return path
