"""Loading a resolved model's components (tokenizers, text encoders, VAE, 2D UNet, DDIM scheduler) from its
diffusers folder, with its LoRAs fused, and encoding prompts with them as diffusers' pipelines do."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tavcli.errors import TavError, first_line
from tavcli.files.reading import read_json
from tavcli.models.conditioning import pack_pooled
from tavcli.models.lora import fuse_loras
from tavcli.models.resolving import variant_of
from tavcli.models.source import Components, ModelSource, quiet_libraries

__all__ = ["encode_prompts", "load_components"]


def load_components(
    source: ModelSource, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False
) -> Components:
    """Load tokenizers, text encoders, VAE, 2D UNet and DDIM scheduler from `source.folder` (and the VAE
    `source.vae` names, where it names one).

    The text encoders and VAE are cast to `dtype` (they are frozen), except an SDXL model's VAE under fp16 when
    its config says `force_upcast` (SDXL's overflows in fp16): it stays float32, as diffusers' SDXL pipeline
    decodes. The UNet stays float32 until the caller decides (tuning needs float32 master weights).
    """
    quiet_libraries()
    folder, safe, variant = source.folder, (None if allow_pickle else True), variant_of(source)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    second = isinstance(index, dict) and any(index.get("text_encoder_2") or ())
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=safe, variant=variant)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if second else None
        text_encoder_2 = (
            CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2", use_safetensors=safe, variant=variant
            )
            if second
            else None
        )
        vae = _vae(source, safe, variant)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=safe, variant=variant)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError) as error:
        hint = None if allow_pickle else "if it has only pickled (.bin) weights and you trust it, pass --trust-pickle"
        raise TavError(f"cannot load the model in {folder}: {first_line(error)}", hint) from None
    if not any(name.endswith("attn2") for name, _ in unet.named_modules()):
        raise TavError(
            f"the UNet in {folder / 'unet'} has no cross-attention blocks: it is not a text-to-image UNet",
            "use a Stable Diffusion 1.x, 2.x or SDXL model",
        )
    # SDXL's pipeline zeros the empty prompt unless its config says otherwise; SD's never does.
    zero_empty = second and bool(index.get("force_zeros_for_empty_prompt", True))
    components = Components(
        source, tokenizer, text_encoder, vae, unet, scheduler, tokenizer_2, text_encoder_2, zero_empty
    )
    if source.loras:
        fuse_loras(components)
    for module in (*components.text_encoders, vae, unet):
        module.requires_grad_(False).eval()
    for encoder in components.text_encoders:
        encoder.to(device=device, dtype=dtype)
    # As SDXL's pipeline does (SD's never upcasts: diffusers' config default `force_upcast` is true for every VAE).
    upcast = second and vae.config.get("force_upcast", False) and dtype == torch.float16
    vae.to(device=device, dtype=torch.float32 if upcast else dtype)
    unet.to(device=device)
    return components


def _vae(source: ModelSource, safe: bool | None, variant: str | None) -> AutoencoderKL:
    """The model's VAE, or the one `--vae` names: a diffusers folder, or a single file read with the model's own
    VAE config (a file holds no config)."""
    if source.vae is None:
        return AutoencoderKL.from_pretrained(source.folder / "vae", use_safetensors=safe, variant=variant)
    if source.vae.is_dir():
        return AutoencoderKL.from_pretrained(source.vae, use_safetensors=safe)
    vae: AutoencoderKL = AutoencoderKL.from_single_file(str(source.vae), config=str(source.folder / "vae"))
    return vae


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), n, d) text embeddings, padded to the tokenizer's full length, as diffusers' pipelines make them.

    SD 1.x/2.x: the text encoder's last hidden states. SDXL: both encoders' penultimate hidden states side by
    side, and the second's pooled embedding as a last row (`tavcli.models.conditioning`); the empty prompt is
    zeros where the model's `force_zeros_for_empty_prompt` says so (as the pipeline makes its default negative).
    """
    if components.text_encoder_2 is None or components.tokenizer_2 is None:
        hidden: torch.Tensor = components.text_encoder(
            _token_ids(components.tokenizer, prompts, components.text_encoder)
        )[0]
        return hidden
    first = components.text_encoder(
        _token_ids(components.tokenizer, prompts, components.text_encoder), output_hidden_states=True
    )
    ids = _token_ids(components.tokenizer_2, prompts, components.text_encoder_2)
    second = components.text_encoder_2(ids, output_hidden_states=True)
    sequence = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
    packed = pack_pooled(sequence, second.text_embeds.to(sequence.dtype))
    if components.zero_empty_prompt:
        empty = torch.tensor([prompt == "" for prompt in prompts], device=packed.device)
        packed = torch.where(empty[:, None, None], torch.zeros_like(packed), packed)
    return packed


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str], encoder: torch.nn.Module) -> torch.Tensor:
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids: torch.Tensor = tokens.input_ids.to(next(encoder.parameters()).device)
    return ids
