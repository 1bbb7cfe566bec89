"""Styles at edit time: LoRAs applied on top of a tuned model for one edit, then taken off again.

A tuned model's `to_q` projections are the tune's own tensors, so a LoRA fused into the base model
before the tune's delta is loaded would lose its `to_q` part. Here the LoRAs are loaded as peft
adapters onto the tuned video UNet (and the text encoder, when the file has text-encoder weights):
each adapted layer computes its own weights, tuned ones included, plus scale * B @ A. Nothing is
fused, so the shared base weights never change, and unloading restores the exact tuned model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tavcli.errors import TavError, first_line
from tavcli.loading import Components
from tavcli.video_unet import VideoUNet

__all__ = ["applied_loras"]


@contextmanager
def applied_loras(components: Components, unet: VideoUNet, loras: tuple[tuple[Path, float], ...]) -> Iterator[None]:
    """Within the block, `unet` and `components.text_encoder` carry `loras` (path, scale), in order."""
    if not loras:
        yield
        return
    from diffusers import StableDiffusionPipeline

    # The pipeline is only the LoRA loader's address book: it maps a LoRA file's keys to the modules.
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=getattr(unet, "_orig_mod", unet),  # the module itself under --compile
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    names = [f"edit{index}" for index in range(len(loras))]
    try:
        for name, (path, _) in zip(names, loras, strict=True):
            try:
                pipe.load_lora_weights(str(path), adapter_name=name)
            except (OSError, ValueError, KeyError) as error:
                raise TavError(f"cannot load the LoRA {path}: {first_line(error)}") from None
            except ImportError:
                raise TavError("LoRAs need peft", 'pip install "tavcli[lora]"') from None
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        yield
    finally:
        pipe.unload_lora_weights()
