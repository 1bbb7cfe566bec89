"""Controlled editing: ControlNet or T2I-Adapter residuals per frame from condition maps (`tav edit --control`).

The ControlNet is diffusers' own `ControlNetModel` (or `T2IAdapter`), run on the folded frames exactly
like the video UNet's 2D layers: frame i of the edit gets the residuals of condition frame i. Condition
frames are sampled like the source frames (same `--frames/--stride/--start`, size and resize).
For `canny` the maps can be computed from the source clip itself (OpenCV).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, T2IAdapter

from tavcli.errors import TavError, first_line
from tavcli.models.conditioning import split_text
from tavcli.models.hub import local_folder, local_only, unreachable
from tavcli.models.source import quiet_libraries

__all__ = ["ControlGuide", "canny_maps", "load_controlnet", "require_fits", "require_opencv"]


def load_controlnet(name: str, device: torch.device, dtype: torch.dtype) -> ControlNetModel | T2IAdapter:
    """A ControlNet or T2I-Adapter from a local folder or the hub (safetensors only)."""
    quiet_libraries()
    path = local_folder(name, "ControlNet", "--control-model")
    offline = path is None and local_only()
    try:
        kind = ControlNetModel
        if path is not None and '"T2IAdapter"' in (path / "config.json").read_text():
            kind = T2IAdapter
        source = name if path is None else str(path)
        model = kind.from_pretrained(source, use_safetensors=True, local_files_only=offline)
    except (OSError, ValueError) as error:
        if offline:
            raise unreachable(name, "give a local ControlNet folder with --control-model") from None
        raise TavError(
            f"cannot load the ControlNet {name!r}: {first_line(error)}", "give a local ControlNet folder"
        ) from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def require_fits(controlnet: ControlNetModel | T2IAdapter, unet: dict[str, Any], name: str) -> None:
    """Refuse, in one line, a ControlNet or T2I-Adapter made for another base than the UNet's (`unet`: its config):
    an SD 1.5 ControlNet on SDXL would fail deep inside diffusers."""
    xl = unet.get("addition_embed_type") == "text_time"
    if isinstance(controlnet, T2IAdapter):
        made_for_xl = controlnet.config.adapter_type == "full_adapter_xl"
        fits, theirs = made_for_xl == xl, "SDXL" if made_for_xl else "SD 1.x/2.x"
    else:
        width = controlnet.config.cross_attention_dim
        fits, theirs = width == unet.get("cross_attention_dim"), f"{width}-wide text"
    if not fits:
        ours = "SDXL" if xl else f"SD with {unet.get('cross_attention_dim')}-wide text"
        raise TavError(
            f"the control model {name!r} was made for {theirs}, and this tune's model is {ours}",
            "give a ControlNet or T2I-Adapter made for the tune's base model",
        )


def require_opencv() -> Any:
    """OpenCV, which canny maps of the source clip need (the `control` extra), or one line saying so."""
    try:
        import cv2
    except ImportError:
        raise TavError(
            "computing canny maps needs OpenCV", "pip install opencv-python-headless, or pass --control-video"
        ) from None
    return cv2


def canny_maps(frames: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge maps (f, h, w, 3) of uint8 frames, white edges on black, as ControlNet-canny expects."""
    cv2 = require_opencv()
    edges = [cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high) for frame in frames]
    return np.stack([np.repeat(edge[..., None], 3, axis=-1) for edge in edges])


class ControlGuide:
    """Computes the ControlNet (or T2I-Adapter) residuals for a video UNet call on (b, c, f, h, w) latents."""

    def __init__(
        self,
        controlnet: ControlNetModel | T2IAdapter,
        maps: np.ndarray,
        scale: float,
        time_ids: torch.Tensor | None = None,
    ) -> None:
        """`time_ids`: an SDXL ControlNet's size numbers, the clip's (`VideoUNet.time_ids`)."""
        self.controlnet = controlnet
        self.time_ids = time_ids
        # (f, 3, H, W) in [0, 1]: the ControlNet's conditioning input.
        self.condition = torch.from_numpy(maps).permute(0, 3, 1, 2).to(controlnet.device, controlnet.dtype) / 255
        self.scale = scale
        self.adapter_features: list[torch.Tensor] | None = None
        if isinstance(controlnet, T2IAdapter):  # an adapter sees only the maps: its features are computed once
            with torch.no_grad():
                self.adapter_features = [feature * scale for feature in controlnet(self.condition)]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        text: torch.Tensor,
        frames: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The residuals for a call on `sample`, which holds the clip's frames `frames` (a window's; None: all)."""
        clips, channels, count, height, width = sample.shape
        if frames is None and count != len(self.condition):
            raise TavError(f"the control clip gives {len(self.condition)} maps for {count} frames")
        if self.adapter_features is not None:  # the UNet consumes this list: a new one per call
            chosen = self.adapter_features if frames is None else [feature[frames] for feature in self.adapter_features]
            return {"down_intrablock_additional_residuals": [f.repeat(clips, 1, 1, 1).to(sample.dtype) for f in chosen]}
        condition = self.condition if frames is None else self.condition[frames]  # a window's maps alone
        folded = sample.transpose(1, 2).reshape(clips * count, channels, height, width)
        sequence, added = split_text(text.to(self.controlnet.dtype), self.controlnet.config, self.time_ids)
        down, mid = self.controlnet(
            folded.to(self.controlnet.dtype),
            timestep,
            sequence.repeat_interleave(count, dim=0),
            controlnet_cond=condition.repeat(clips, 1, 1, 1),
            conditioning_scale=self.scale,
            added_cond_kwargs=None if added is None else {k: v.repeat_interleave(count, 0) for k, v in added.items()},
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
