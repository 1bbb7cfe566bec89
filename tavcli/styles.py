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

from tavcli.loading import Components, load_lora, lora_loader
from tavcli.video_unet import VideoUNet

__all__ = ["applied_loras", "overflow_causes"]


def overflow_causes(precision: str, loras: object) -> str | None:
    """What may have made a result with these edit-time LoRAs NaN or inf, and what to try: only what would
    help (bf16 and fp32 share a range, so only fp16 overflows where they would not)."""
    causes = ["a LoRA scale may be too large: try a smaller PATH:SCALE"] if loras else []
    if precision == "fp16":
        causes.append("fp16 may have overflowed: try --precision bf16 or fp32")
    return "; ".join(causes) or None


@contextmanager
def applied_loras(components: Components, unet: VideoUNet, loras: tuple[tuple[Path, float], ...]) -> Iterator[None]:
    """Within the block, `unet` and `components.text_encoder` carry `loras` (path, scale), in order."""
    if not loras:
        yield
        return
    module = getattr(unet, "_orig_mod", unet)  # the module itself under --compile
    pipe = lora_loader(components.tokenizer, components.text_encoder, components.vae, module, components.scheduler)
    names = [f"edit{index}" for index in range(len(loras))]
    try:
        for name, (path, _) in zip(names, loras, strict=True):
            load_lora(pipe, path, name)
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        yield
    finally:
        pipe.unload_lora_weights()
