"""Loading a resolved model's components (tokenizer, text encoder, VAE, 2D UNet, DDIM scheduler) from its
diffusers folder, with its LoRAs fused, and encoding prompts with them."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tavcli.errors import TavError, first_line
from tavcli.models.lora import fuse_loras
from tavcli.models.resolving import variant_of
from tavcli.models.source import Components, ModelSource, quiet_libraries

__all__ = ["encode_prompts", "load_components"]


def load_components(
    source: ModelSource, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False
) -> Components:
    """Load tokenizer, text encoder, VAE, 2D UNet and DDIM scheduler from `source.folder`.

    The text encoder and VAE are cast to `dtype` (they are frozen); the UNet stays float32 until
    the caller decides (tuning needs float32 master weights).
    """
    quiet_libraries()
    folder, safe, variant = source.folder, (None if allow_pickle else True), variant_of(source)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=safe, variant=variant)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=safe, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=safe, variant=variant)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError) as error:
        hint = None if allow_pickle else "if it has only pickled (.bin) weights and you trust it, pass --trust-pickle"
        raise TavError(f"cannot load the model in {folder}: {first_line(error)}", hint) from None
    if not any(name.endswith("attn2") for name, _ in unet.named_modules()):
        raise TavError(
            f"the UNet in {folder / 'unet'} has no cross-attention blocks: it is not a text-to-image UNet",
            "use a Stable Diffusion 1.x/2.x model",
        )
    if source.loras:
        fuse_loras(source, tokenizer, text_encoder, vae, unet, scheduler)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    text_encoder.to(device=device, dtype=dtype)
    vae.to(device=device, dtype=dtype)
    unet.to(device=device)
    return Components(source, tokenizer, text_encoder, vae, unet, scheduler)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), n, d) CLIP text embeddings, padded to the tokenizer's full length."""
    tokens = components.tokenizer(
        prompts,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    hidden: torch.Tensor = components.text_encoder(tokens.input_ids.to(components.text_encoder.device))[0]
    return hidden
