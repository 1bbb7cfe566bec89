"""Reading a model folder saved by the reference Tune-A-Video training script (`tav import`).

The reference saves the whole pipeline after tuning: `unet/` holds the full video UNet (its 2D
weights under the usual diffusers names plus `attn_temp`/`norm_temp`), and `config.yaml` the
run's settings (`train_data.video_path`, `prompt`, `n_sample_frames`, ...). tavcli keeps only
what tuning changed, so an import extracts the tuned tensors and checks that everything else is
the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tavcli.errors import TavError
from tavcli.method.video_unet import TRAINABLE_MODULE_SUFFIXES

__all__ = ["ReferenceRun", "extract_delta", "read_reference"]

# What tuning changes: the trained projections, plus the temporal norms the reference adds (untrained, kept as saved).
DELTA_MARKERS = (*(f"{suffix}." for suffix in TRAINABLE_MODULE_SUFFIXES), "norm_temp.")


@dataclass(frozen=True)
class ReferenceRun:
    """The reference run's UNet weights and the settings its `config.yaml` records (None where absent)."""

    weights: dict[str, torch.Tensor]
    weights_file: Path
    settings: dict[str, Any]

    def get(self, name: str) -> Any:
        return self.settings.get(name)


def read_reference(folder: Path, trust_pickle: bool) -> ReferenceRun:
    """Load `folder/unet` (safetensors, or a pickle only with `trust_pickle`) and `folder/config.yaml`."""
    unet = folder / "unet"
    if not unet.is_dir():
        raise TavError(f"{folder} is not a Tune-A-Video output folder (no unet/ inside)")
    safe = sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
    pickled = sorted(unet.glob("diffusion_pytorch_model*.bin"))
    if safe:
        from safetensors.torch import load_file

        weights = {k: v for f in safe for k, v in load_file(str(f)).items()}
        weights_file = safe[0]
    elif pickled and trust_pickle:
        # weights_only: tensors and containers only, no arbitrary objects (torch refuses the rest).
        weights = {k: v for f in pickled for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
        weights_file = pickled[0]
    elif pickled:
        raise TavError(
            f"{unet} holds only pickled weights (.bin)", "pass --trust-pickle if you trust where the folder came from"
        )
    else:
        raise TavError(f"{unet} has no diffusion_pytorch_model weights")
    return ReferenceRun(weights, weights_file, _settings(folder / "config.yaml"))


def _settings(path: Path) -> dict[str, Any]:
    """The reference's `config.yaml`, flattened to the names tavcli uses."""
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
        data = config.get("train_data") or {}
        return {
            "clip": data.get("video_path"),
            "prompt": data.get("prompt"),
            "frames": data.get("n_sample_frames"),
            "stride": data.get("sample_frame_rate"),
            "start": data.get("sample_start_idx"),
            "width": data.get("width"),
            "height": data.get("height"),
            "steps": config.get("max_train_steps"),
            "learning_rate": float(config["learning_rate"]) if "learning_rate" in config else None,
            "seed": config.get("seed"),
            "base_model": config.get("pretrained_model_path"),
        }
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
        raise TavError(f"cannot read {path}: {error}") from None


def extract_delta(weights: dict[str, torch.Tensor], video_unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tuned tensors of a reference UNet, after checking it is `video_unet`'s architecture and base."""
    own = video_unet.state_dict()
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise TavError(
            f"the checkpoint does not fit the base model: {len(unknown)} unknown tensors such as {unknown[0]}",
            "pass the base model it was tuned from with --model",
        )
    delta, changed = {}, []
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise TavError(f"{name} is {tuple(tensor.shape)} in the checkpoint but {tuple(own[name].shape)} here")
        if any(marker in name for marker in DELTA_MARKERS):
            delta[name] = tensor.float()
        elif not torch.allclose(tensor.float(), own[name].float(), atol=1e-3, rtol=1e-3):
            changed.append(name)
    if changed:
        raise TavError(
            f"the checkpoint was tuned from another base model: {len(changed)} frozen tensors differ ({changed[0]})",
            "pass the base model it was tuned from with --model",
        )
    if not any(".attn_temp." in name for name in delta):
        raise TavError("the checkpoint has no temporal attention (attn_temp): it is not a Tune-A-Video UNet")
    return delta
