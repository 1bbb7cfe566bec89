"""Low-rank tunes (`tav tune --rank R`): peft LoRA adapters on the layers Tune-A-Video tunes
(docs/method.md, "Tuning").

The adapted layers are the linear layers of `TRAINABLE_MODULE_SUFFIXES`: `attn1.to_q`, `attn2.to_q` and
`attn_temp.to_q/to_k/to_v/to_out.0` of every transformer block (six per block). A low-rank tune stores
only the adapter tensors, named as `low_rank_parameters` returns them, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.tav.weight` (rank x in) and
`...lora_B.tav.weight` (out x rank). The temporal attention's base weights are not stored: the caller
re-creates them by seeding torch before `inflate_unet`, and `temporal_init_digest` checks that they
match the ones the tune was trained on.

While adapters are attached, the wrapped layers keep their base weights under `<layer>.base_layer.*`
(in `state_dict()` and `named_parameters()`), so `trainable_parameters` returns base and adapter
tensors together: a low-rank tune trains and stores `low_rank_parameters` instead.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from tavcli.errors import TavError
from tavcli.method.video_unet import VideoUNet

__all__ = [
    "ADAPTER",
    "LOW_RANK_TARGETS",
    "add_low_rank_adapters",
    "load_low_rank",
    "low_rank_parameters",
    "merge_low_rank",
    "temporal_init_digest",
]

ADAPTER = "tav"  # the adapter's name, part of every stored tensor's name
# peft matches a module whose name equals a target or ends in "." + target: exactly these linear layers
# (`attn_temp.to_out.0`, not its dropout `to_out.1`; neither `to_k` nor `to_v` of attn1/attn2).
LOW_RANK_TARGETS = (
    "attn1.to_q",
    "attn2.to_q",
    "attn_temp.to_q",
    "attn_temp.to_k",
    "attn_temp.to_v",
    "attn_temp.to_out.0",
)
_MARKERS = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")


def add_low_rank_adapters(unet: VideoUNet, rank: int) -> None:
    """Wrap the tuned linear layers with rank-`rank` LoRA adapters named `ADAPTER`.

    lora_alpha = rank (scale 1) and peft's default init (B = 0): the model's output is unchanged until
    trained. peft freezes every other parameter of `unet` (its own Parameter objects: the 2D UNet it was
    inflated from keeps its flags); the adapter tensors require grad.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, not {rank}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise TavError("--rank needs peft", 'pip install "tavcli[lora]"') from None
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LOW_RANK_TARGETS), lora_dropout=0.0)
    unet.add_adapter(config, adapter_name=ADAPTER)


def low_rank_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter tensors by name (the lora_A / lora_B weights): what a low-rank tune trains and stores."""
    return {name: param for name, param in unet.named_parameters() if any(m in name for m in _MARKERS)}


def load_low_rank(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy stored adapter tensors into `unet`'s adapters (added with the same rank).

    Raises ValueError when a tensor has no adapter, an adapter has no tensor, or a shape differs
    (a tune of another rank or another model).
    """
    params = low_rank_parameters(unet)
    unexpected, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"the low-rank tensors do not fit this model: {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(missing)} missing (e.g. {missing[:2]})"
        )
    wrong = [name for name, tensor in tensors.items() if tensor.shape != params[name].shape]
    if wrong:
        raise ValueError(
            f"the low-rank tensors do not fit this model: {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, "
            f"the model's {tuple(params[wrong[0]].shape)} ({len(wrong)} differ)"
        )
    unet.load_state_dict(tensors, strict=False)  # names and shapes were checked above


def merge_low_rank(unet: VideoUNet) -> None:
    """Fold the adapters into their layers and remove them, so sampling costs what it costs without them.

    Safe because every adapted layer is the VideoUNet's own: `inflate_unet` clones `attn1/attn2.to_q`
    and `attn_temp` is new, so the 2D UNet it was inflated from stays untouched.
    """
    unet.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    unet.unload_lora()


def temporal_init_digest(unet: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the `attn_temp` and `norm_temp` base tensors, by sorted name.

    Recorded with a low-rank tune before training and checked when its base is re-created. Adapter
    tensors are left out and `.base_layer` dropped from names, so adding (unmerged) adapters or
    training them does not change it. Values are hashed as float32 (exact for fp16 and bf16).
    """
    digest = hashlib.sha256()
    tensors = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in unet.state_dict().items()
        if (".attn_temp." in name or ".norm_temp." in name) and ".lora_" not in name
    }
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
