"""Which model families tavcli computes, read from a model folder's configs before anything loads.

tavcli's UNet takes noisy latents, a timestep and one text embedding per clip: the SD 1.x and 2.x text-to-image
UNets, and SDXL's, which also takes pooled text and size numbers (`tavcli.models.conditioning`). A UNet that
needs inputs tavcli does not provide (a mask and masked image, a depth map, image embeddings, the SDXL
refiner's aesthetic score) would fail deep inside diffusers, or worse compute something else, so it is refused
in one line when the model is resolved. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.reading import read_json

__all__ = ["model_family", "require_supported"]

# A UNet's extra input channels beside the 4 latent ones, by what they are for.
_EXTRA_CHANNELS = {
    5: "a depth-to-image model (its UNet also takes a depth map)",
    7: "an upscaling model (its UNet also takes a small image)",
    9: "an inpainting model (its UNet also takes a mask and an image)",
}


def require_supported(folder: Path, name: str) -> None:
    """Refuse, in one line naming what model `name` (at `folder`) is, a UNet tavcli cannot drive."""
    unet = _config(folder / "unet" / "config.json")
    index = _config(folder / "model_index.json")
    what = _unsupported(unet, index)
    if what is None and _config(folder / "vae" / "config.json").get("latents_mean") is not None:
        what = (
            "a model whose VAE normalises latents by a mean and std (e.g. Playground v2.5), which tavcli does not apply"
        )
    if what is not None:
        raise TavError(
            f"{name} is {what}: tavcli tunes and edits text-to-image SD 1.x, 2.x and SDXL models",
            "e.g. CompVis/stable-diffusion-v1-4",
        )


def model_family(folder: Path) -> str:
    """`sdxl` for an SDXL model (its UNet takes pooled text and size numbers), else `sd` (SD 1.x and 2.x)."""
    return "sdxl" if _config(folder / "unet" / "config.json").get("addition_embed_type") == "text_time" else "sd"


def _unsupported(unet: dict[str, Any], index: dict[str, Any]) -> str | None:
    """What the model is, in words, when its UNet needs inputs tavcli does not give; None when it does not."""
    channels = unet.get("in_channels", 4)
    if channels != 4:
        return _EXTRA_CHANNELS.get(channels, f"a model whose UNet takes {channels} input channels, not 4")
    if unet.get("addition_embed_type") == "text_time":
        first_encoder = not index or any(index.get("text_encoder") or ())  # the refiner's is [null, null]
        if index.get("requires_aesthetics_score") or not first_encoder:
            return "the SDXL refiner (its UNet also takes an aesthetic score)"
        if not any(index.get("text_encoder_2") or ()):
            return "an SDXL UNet without SDXL's second text encoder (no text_encoder_2 in model_index.json)"
        return None
    if unet.get("addition_embed_type") or unet.get("class_embed_type") or unet.get("encoder_hid_dim_type"):
        return "a model whose UNet takes image or class conditioning"
    if index.get("_class_name") == "StableDiffusionImageVariationPipeline":
        return "an image-variation model (conditioned on images, not text)"
    return None


def _config(path: Path) -> dict[str, Any]:
    """A config file's settings; {} where the folder has none (a diffusers folder always has the UNet's)."""
    if not path.is_file():
        return {}
    try:
        value = read_json(path)
    except (OSError, ValueError) as error:
        raise TavError(f"{path} cannot be read as a model config: {error}") from None
    return value if isinstance(value, dict) else {}
