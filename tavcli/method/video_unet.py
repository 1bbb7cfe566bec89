"""The video UNet: diffusers' own `UNet2DConditionModel`, inflated in place of a copied 3D UNet.

Inflation (Tune-A-Video, docs/method.md, "Inflation"), done by attaching small pieces to the 2D model:

- frames are folded into the batch, so every convolution acts on each frame alone;
- ResNet GroupNorms and `conv_norm_out` take their statistics over all frames of a clip
  (the reference applies `nn.GroupNorm` to a 5D tensor); `frame_norm="frame"` keeps them per frame;
- `attn1` becomes sparse-causal: frame i attends to frames 0 and i-1 (an attention processor);
- every `BasicTransformerBlock` ends with `h + attn_temp(norm_temp(h))` over the frame axis
  (a forward hook, with the modules registered under the reference's parameter names).

The 2D weights are shared with the UNet passed in, never copied or changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from tavcli.choices import FrameNorm
from tavcli.models.conditioning import split_text

__all__ = [
    "TRAINABLE_MODULE_SUFFIXES",
    "VideoUNet",
    "inflate_unet",
    "sparse_causal_attention",
    "sparse_causal_context",
    "split_heads",
    "trainable_parameters",
]


# The reference tunes the modules whose names end in these (docs/method.md, "Tuning").
TRAINABLE_MODULE_SUFFIXES = ("attn1.to_q", "attn2.to_q", "attn_temp")


@dataclass
class ClipLayout:
    """How many frames each clip in the folded batch has; set by `VideoUNet.forward`.

    A side channel, shared by every inflated module of one UNet and read during its forward: one
    forward at a time per UNet (nested or concurrent calls on one UNet from several threads would see
    each other's frame count). tavcli calls each UNet from one thread, one call at a time.
    """

    frames: int = 1


class VideoUNet(UNet2DConditionModel):  # type: ignore[misc]  # diffusers is not followed: Any to mypy
    """A `UNet2DConditionModel` that takes clips: `sample` is (b, c, f, h, w), one text embedding per clip.

    An SDXL UNet's text carries its pooled embedding as a last row (`tavcli.models.conditioning`), and the UNet
    holds the clip's size numbers in `time_ids`; both are given to every frame.
    """

    clip_layout: ClipLayout
    time_ids: torch.Tensor | None = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        batch, channels, frames, height, width = sample.shape
        self.clip_layout.frames = frames
        folded = sample.transpose(1, 2).reshape(batch * frames, channels, height, width)
        sequence, added = split_text(encoder_hidden_states, self.config, self.time_ids)
        text = sequence.repeat_interleave(frames, dim=0)
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and timestep.numel() == batch:
            timestep = timestep.repeat_interleave(frames)
        if added is not None:  # SDXL's pooled text and size numbers: one per clip, so per frame
            kwargs["added_cond_kwargs"] = {
                name: value.repeat_interleave(frames, dim=0) for name, value in added.items()
            }
        out = super().forward(folded, timestep, text, **kwargs).sample
        out = out.reshape(batch, frames, -1, height, width).transpose(1, 2)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class FrameJointGroupNorm(nn.GroupNorm):
    """GroupNorm over a folded (b*f, c, h, w) batch whose statistics span all f frames of each clip."""

    def __init__(self, norm: nn.GroupNorm, layout: ClipLayout) -> None:
        with torch.device("meta"):
            super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.weight, self.bias = norm.weight, norm.bias
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.layout.frames
        folded, channels, height, width = x.shape
        # (b*f, c, h, w) -> (b, c, f*h*w): channels must stay on axis 1 for group_norm.
        clip = x.reshape(folded // frames, frames, channels, height * width).transpose(1, 2)
        out = F.group_norm(
            clip.reshape(folded // frames, channels, -1), self.num_groups, self.weight, self.bias, self.eps
        )
        return out.reshape(folded // frames, channels, frames, height * width).transpose(1, 2).reshape(x.shape)


def sparse_causal_context(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, n, c) -> (b*f, 2n, c): frame i's tokens become those of frame 0 followed by frame i-1's.

    The reference's definition (frames 0 and 1 see frame 0 twice); `SparseCausalAttnProcessor`
    computes the same attention without building this tensor.
    """
    folded, n, channels = tokens.shape
    clips = tokens.reshape(folded // frames, frames, n, channels)
    previous = (torch.arange(frames, device=tokens.device) - 1).clamp(min=0)
    first = clips[:, :1].expand(-1, frames, -1, -1)
    return torch.cat([first, clips[:, previous]], dim=2).reshape(folded, 2 * n, channels)


class SparseCausalAttnProcessor:
    """Self-attention where frame i's queries see the keys and values of frames 0 and i-1 (SDPA).

    Frames 0 and 1 see frame 0 twice; attending to duplicated keys equals attending to them once
    (each weight and the normaliser both double), so those frames attend to frame 0's n tokens
    and only frames 2.. attend to 2n: 12.5% less attention work at 8 frames, same numbers up to
    float rounding.
    """

    def __init__(self, layout: ClipLayout) -> None:
        self.layout = layout

    @staticmethod
    def check_supported(attn: Attention) -> None:
        """Refuse an attention using what this processor does not compute (all inert in SD 1.x and 2.x)."""
        used = [
            name
            for name, inert in (
                ("spatial_norm", attn.spatial_norm is None),
                ("group_norm", attn.group_norm is None),
                ("norm_q", attn.norm_q is None),
                ("norm_k", attn.norm_k is None),
                ("residual_connection", not attn.residual_connection),
                ("rescale_output_factor", attn.rescale_output_factor == 1.0),
            )
            if not inert
        ]
        if used:
            raise ValueError(
                f"sparse-causal attention does not support {', '.join(used)} (an SD 1.x/2.x UNet has none)"
            )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:  # SD's self-attention has no mask; one here would be silently dropped
            raise ValueError("sparse-causal attention does not support an attention mask")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = sparse_causal_attention(attn, q, k, v, self.layout.frames)
        projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
        return projected


def sparse_causal_attention(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, frames: int
) -> torch.Tensor:
    """Projected (b*f, n, c) queries, keys and values -> (b*f, n, c) sparse-causal attention, before `to_out`.

    Frame i's queries attend to frames 0 and i-1's keys; the queries, keys and values may come from different
    clips (attention control replays a source clip's queries and keys over an edit's values).
    """
    folded, n, _ = query.shape
    clips = folded // frames
    # Projected once per token, then frames picked: cheaper than projecting the gathered context.
    query, key, value = (t.unflatten(0, (clips, frames)) for t in (query, key, value))  # (b, f, n, c)
    head = min(frames, 2)  # the frames whose context is frame 0 alone
    parts = [_attend(attn, query[:, :head], key[:, :1], value[:, :1])]
    if frames > 2:
        context_k = torch.cat([key[:, :1].expand(-1, frames - 2, -1, -1), key[:, 1:-1]], dim=2)
        context_v = torch.cat([value[:, :1].expand(-1, frames - 2, -1, -1), value[:, 1:-1]], dim=2)
        parts.append(_attend(attn, query[:, 2:], context_k, context_v))
    return torch.cat(parts, dim=1).reshape(folded, n, -1)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Queries (b, f, n, c) attend to keys and values (b, f or 1, m, c), frame by frame -> (b, f, n, c)."""
    clips, frames, n, _ = query.shape
    key, value = key.expand(-1, frames, -1, -1), value.expand(-1, frames, -1, -1)
    q, k, v = (split_heads(t.reshape(clips * frames, t.shape[2], -1), attn.heads) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out.transpose(1, 2).flatten(2).to(query.dtype).reshape(clips, frames, n, -1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads*d) -> (batch, heads, tokens, d)."""
    split: torch.Tensor = x.unflatten(-1, (heads, -1))
    return split.transpose(1, 2)


class _TemporalAttentionHook:
    """Forward hook that ends a `BasicTransformerBlock` with `h + attn_temp(norm_temp(h))` over frames."""

    def __init__(self, layout: ClipLayout) -> None:
        self.layout = layout

    def __call__(self, block: Any, args: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = self.layout.frames
        folded, tokens, channels = hidden_states.shape
        # (b*f, d, c) -> (b*d, f, c): each spatial position becomes a sequence of f tokens.
        seq = hidden_states.reshape(folded // frames, frames, tokens, channels).transpose(1, 2)
        seq = seq.reshape(-1, frames, channels)
        attended: torch.Tensor = block.attn_temp(block.norm_temp(seq))
        seq = seq + attended
        seq = seq.reshape(folded // frames, tokens, frames, channels).transpose(1, 2)
        return seq.reshape(folded, tokens, channels)


def _add_temporal_attention(block: BasicTransformerBlock, layout: ClipLayout) -> None:
    spatial = block.attn1
    dim = spatial.query_dim
    weight = spatial.to_q.weight
    block.attn_temp = Attention(
        query_dim=dim,
        heads=spatial.heads,
        dim_head=spatial.inner_dim // spatial.heads,
        bias=spatial.to_q.bias is not None,
        upcast_attention=spatial.upcast_attention,
        processor=AttnProcessor2_0(),
    ).to(weight.device)  # float32 whatever the base holds: a seed re-creates the very weights a tune started from
    # Zero output projection: a freshly inflated model starts close to the image model.
    nn.init.zeros_(block.attn_temp.to_out[0].weight)
    block.norm_temp = nn.LayerNorm(dim).to(weight.device)
    block.register_forward_hook(_TemporalAttentionHook(layout))


def inflate_unet(
    unet: UNet2DConditionModel,
    frame_norm: FrameNorm = "joint",
    seed: int | None = None,
    time_ids: torch.Tensor | None = None,
) -> VideoUNet:
    """Return the video UNet for `unet`, sharing its frozen weights (the tuned projections are copies).

    New temporal modules are initialised in float32 from torch's global RNG, or from `seed` (reproducibly,
    leaving the global RNG as it was): a tune's seed re-creates the temporal weights it started from.
    `frame_norm="joint"` (the reference) normalises ResNet features over all frames of a clip;
    `"frame"` normalises each frame alone, like the image model. An SDXL UNet needs its clip's `time_ids`
    (`tavcli.models.conditioning.SizeConditioning`).
    """
    if frame_norm not in ("joint", "frame"):
        raise ValueError(f"frame_norm must be 'joint' or 'frame', not {frame_norm!r}")
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            SparseCausalAttnProcessor.check_supported(block.attn1)  # it becomes sparse-causal
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return inflate_unet(unet, frame_norm, time_ids=time_ids)
    with torch.device("meta"):
        video: VideoUNet = VideoUNet.from_config(unet.config)
    video.load_state_dict(unet.state_dict(), strict=True, assign=True)
    video.train(unet.training)
    # Tuning and deltas change these projections: own copies keep the image model's weights untouched.
    for name, module in video.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_q")):
            module.weight = nn.Parameter(module.weight.detach().clone(), module.weight.requires_grad)
    layout = ClipLayout()
    video.clip_layout = layout
    video.time_ids = time_ids

    for module in list(video.modules()):
        if isinstance(module, BasicTransformerBlock):
            _add_temporal_attention(module, layout)
        elif isinstance(module, ResnetBlock2D) and frame_norm == "joint":
            module.norm1 = FrameJointGroupNorm(module.norm1, layout)
            module.norm2 = FrameJointGroupNorm(module.norm2, layout)
    if frame_norm == "joint" and video.conv_norm_out is not None:
        video.conv_norm_out = FrameJointGroupNorm(video.conv_norm_out, layout)

    video.set_attn_processor(
        {
            name: SparseCausalAttnProcessor(layout) if name.endswith("attn1.processor") else AttnProcessor2_0()
            for name in video.attn_processors
        }
    )
    return video


def trainable_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters Tune-A-Video tunes, by name: `attn1.to_q`, `attn2.to_q` and all of `attn_temp`."""
    return {
        f"{module_name}.{param_name}": param
        for module_name, module in unet.named_modules()
        if module_name.endswith(TRAINABLE_MODULE_SUFFIXES)
        for param_name, param in module.named_parameters()
    }
