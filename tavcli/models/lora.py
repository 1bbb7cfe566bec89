"""LoRAs, all of their loading in one place: onto a model's modules as peft adapters, fused into the base
weights of a model named with `lora=PATH:SCALE` (`fuse_loras`, before a tune), or applied to a tuned model
for one edit (`applied_loras`); and what a file that does not fit this model says about the base it was
made for. A LoRA adapts the UNet and each text encoder it has weights for: SDXL's second one too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tavcli.errors import TavError, first_line, interruption
from tavcli.files.hashing import lora_file
from tavcli.models.source import Components
from tavcli.settings.inputs import require_regular_file

__all__ = ["applied_loras", "fuse_loras", "load_lora", "lora_base_guess", "lora_loader"]

CROSS_ATTENTION_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
SDXL_KEYS = ("text_encoder_2", "lora_te2_", "add_embedding", "conditioner.embedders")  # parts only SDXL has
MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def lora_loader(components: Components, unet: Any | None = None) -> Any:
    """A pipeline made only to load LoRAs: diffusers' LoRA loading maps a file's keys onto these modules (`unet`
    instead of the model's own 2D UNet where given). SDXL's pipeline reads SDXL's formats (kohya's `lora_unet_`,
    `lora_te1_` and `lora_te2_` keys, and diffusers'), and loads, weighs, fuses and unloads adapters on its
    `text_encoder_2` as on the others."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": components.unet if unet is None else unet,
        "scheduler": components.scheduler,
    }
    if components.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            **parts, text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2, add_watermarker=False
        )
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_lora(pipe: Any, path: Path, adapter_name: str) -> None:
    """Load one LoRA (file or folder) onto `lora_loader`'s modules as an unfused peft adapter.

    The file is the user's: whatever diffusers, peft or safetensors raise on it becomes one line
    (diffusers takes a failed adapter off again itself).
    """
    weights = _lora_weights(path)
    try:
        pipe.load_lora_weights(str(path), weight_name=weights, adapter_name=adapter_name)
    except ImportError:
        raise TavError("LoRAs need peft", 'pip install "tavcli[lora]"') from None
    except Exception as error:
        if interruption(error) or isinstance(error, torch.OutOfMemoryError):
            raise  # not the file's fault: the command line reports these
        if "size mismatch for" not in str(error):
            raise TavError(f"cannot load the LoRA {path}: {first_line(error)}") from None
        raise TavError(
            f"the LoRA {path} does not fit this model: its tensor shapes are another model's"
            + lora_base_guess(_foreign_keys(pipe, path, weights), str(error)),
            _lora_hint(pipe),
        ) from None
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        # diffusers only warns when no key names a part of this model: the LoRA would change nothing
        raise TavError(
            f"the LoRA {path} adapts nothing in this model: none of its keys name one of its layers"
            + lora_base_guess(_foreign_keys(pipe, path, weights), ""),
            _lora_hint(pipe),
        )


def _lora_weights(path: Path) -> str | None:
    """The weights file diffusers is to load from a LoRA folder, the one its identity hashes (`lora_file`);
    None for a file, or a folder of `.bin` weights, which diffusers searches itself. Only regular files
    are opened."""
    hint = "give a LoRA .safetensors file, or the folder that holds it"
    if not path.is_dir():
        require_regular_file(path, "LoRA file", hint)
        return None
    chosen = lora_file(path)
    require_regular_file(chosen, "LoRA file", hint)
    return chosen.name if chosen.suffix == ".safetensors" else None


def lora_base_guess(keys: list[str], mismatches: str) -> str:
    """What a LoRA's keys and torch's size-mismatch lines tell of the base it was made for, as a clause
    to end a message with; empty when they do not tell (a guess is said only where the evidence is plain)."""
    marks = [mark for mark in SDXL_KEYS if any(mark in key for key in keys)]
    if marks:
        return f"; it was made for SDXL, by its {marks[0]} keys"
    for name, given, here in MISMATCH.findall(mismatches):
        # a LoRA's down projection of attn2's key or value takes the text embeddings: its width is theirs
        if ".attn2.to_k.lora_A." not in name and ".attn2.to_v.lora_A." not in name:
            continue
        width, own = int(given.split(",")[-1]), int(here.split(",")[-1])
        base = CROSS_ATTENTION_BASES.get(width)
        if base is None:
            return f"; its cross-attention is {width}-wide, this model's {own}-wide"
        return f"; it was made for {base}, by its {width}-wide cross-attention (this model's is {own}-wide)"
    return ""


def _foreign_keys(pipe: Any, path: Path, weights: str | None) -> list[str]:
    """The LoRA's keys, where they can tell another base: SDXL's marks say nothing about an SDXL model's LoRA."""
    return [] if getattr(pipe, "text_encoder_2", None) is not None else _lora_keys(path, weights)


def _lora_keys(path: Path, weights: str | None) -> list[str]:
    """The tensor names of the LoRA file loaded (`_lora_weights`), read from its header (none when unknown)."""
    from safetensors import SafetensorError, safe_open

    file = path / weights if weights else path
    if not file.is_file():
        return []  # a folder diffusers searched itself
    try:
        with safe_open(str(file), framework="pt") as opened:
            return list(opened.keys())
    except (OSError, SafetensorError):
        return []


def _lora_hint(pipe: Any) -> str:
    """Which LoRAs would fit: those of this model's base, named where its second text encoder (SDXL) or its text
    width tells it."""
    width = getattr(pipe.unet.config, "cross_attention_dim", None)
    base = CROSS_ATTENTION_BASES.get(width) if isinstance(width, int) else None
    base = "SDXL" if getattr(pipe, "text_encoder_2", None) is not None else base
    return f"use a LoRA made for {base} models" if base else "use a LoRA made for this model's base"


def fuse_loras(components: Components) -> None:
    """Fuse each LoRA, at its scale, into the weights of the UNet and of each text encoder it has weights for
    (SDXL's two) with diffusers' LoRA loading (needs peft); the adapters are then taken off every part."""
    pipe = lora_loader(components)
    for index, (path, scale) in enumerate(components.source.loras):
        load_lora(pipe, path, f"lora{index}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"lora{index}"])
        pipe.unload_lora_weights()


@contextmanager
def applied_loras(components: Components, unet: nn.Module, loras: tuple[tuple[Path, float], ...]) -> Iterator[None]:
    """Within the block, `unet` and the text encoders (`components.text_encoders`: SDXL's two) carry `loras`
    (path, scale), in order.

    Styles at edit time: a tuned model's `to_q` projections are the tune's own tensors, so a LoRA fused into
    the base model before the tune's delta is loaded would lose its `to_q` part. Here the LoRAs are peft
    adapters on the tuned video UNet (and on each text encoder the file has weights for): each adapted layer
    computes its own weights, tuned ones included, plus scale * B @ A. Nothing is fused, so the shared base
    weights never change, and unloading (from the UNet and every text encoder, grad flags given back) restores the
    exact tuned model.
    """
    if not loras:
        yield
        return
    module = getattr(unet, "_orig_mod", unet)  # the module itself under --compile
    pipe = lora_loader(components, module)
    names = [f"edit{index}" for index in range(len(loras))]
    # peft freezes every base parameter it adapts a model's layers around; unloading leaves them frozen, and CPU
    # kernels can round differently for frozen weights, so the exact model needs its flags back too.
    flags = [
        (param, param.requires_grad) for part in (module, *components.text_encoders) for param in part.parameters()
    ]
    try:
        for name, (path, _) in zip(names, loras, strict=True):
            load_lora(pipe, path, name)
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        yield
    finally:
        pipe.unload_lora_weights()
        for param, flag in flags:
            param.requires_grad_(flag)
