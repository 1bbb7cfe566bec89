"""Write a diffusers Stable Diffusion folder as one original-format (LDM/CompVis) checkpoint.

Community and DreamBooth models are shared in that layout. diffusers only converts *from* it, so the
tests make their single-file models with this inverse key map (the layout of the CompVis `sd-v1`
checkpoints: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]  # fmt: skip
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def ldm_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and CLIP text encoder of `folder` under their original-format names."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    checkpoint = {}
    for name, tensor in _weights(folder / "unet").items():
        checkpoint[f"model.diffusion_model.{_unet_key(name, unet_config)}"] = tensor
    for name, tensor in _weights(folder / "vae").items():
        key = _vae_key(name, len(vae_config["up_block_types"]))
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        checkpoint[f"first_stage_model.{key}"] = tensor
    for name, tensor in _weights(folder / "text_encoder").items():
        # transformers >= 5.6 dropped the `text_model.` level that original checkpoints keep
        name = name if name.startswith("text_model.") else f"text_model.{name}"
        checkpoint[f"cond_stage_model.transformer.{name}"] = tensor
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


def _weights(part: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(part.glob("*.safetensors")) for k, v in load_file(file).items()}


def _unet_key(name: str, config: dict) -> str:
    layers = config["layers_per_block"] + 1  # resnets (+ attentions) and one down/upsampler slot per block
    module, _, leaf = name.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(m[1]) * layers + int(m[3])}.{_layer(m[2], m[4])}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * layers}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(m[1]) * layers + int(m[3])}.{_layer(m[2], m[4])}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"output_blocks.{block * layers + layers - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-format name for UNet tensor {name}")


def _layer(kind: str, rest: str) -> str:
    """A resnet is item 0 of its block, an attention item 1."""
    return f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def _vae_key(name: str, blocks: int) -> str:
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.", name)
    name = re.sub(r"(decoder\.up\.\d+)\.resnets\.", r"\1.block.", name).replace("upsamplers.0.", "upsample.")
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    if "mid_block.attentions.0." in name:
        name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in VAE_ATTENTION:
            name = name.replace(f".attn_1.{new}.", f".attn_1.{old}.")
    return name
