"""SDXL's extra UNet inputs, carried so that every method step still handles one text tensor.

SDXL's UNet takes, beside the token sequence (b, 77, 2048), the second text encoder's pooled embedding (b, 1280)
and six size numbers, its micro-conditioning: the original height and width, the crop's top and left, and the
target height and width (docs/method.md, "SDXL"). tavcli appends the pooled embedding to the sequence as one
more row, zero-padded to the sequence's width: guidance's concatenation, the embeddings cache, the null-text fit
of the unconditional embedding and attention control then handle SDXL's conditioning as they handle SD's. The
video UNet takes that row off again before its layers see the text, so attention sees the 77 tokens alone.
The size numbers belong to the clip, not the prompt: the video UNet holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SizeConditioning", "pack_pooled", "pooled_width", "split_text"]

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's six size numbers for a clip: its frames' size as decoded, the crop tavcli made of them once they
    were scaled, and the size the model sees (as SDXL was trained: scaled to cover, then cropped)."""

    original: tuple[int, int]  # (height, width) of the decoded, upright frames
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the scaled frames; (0, 0) when stretched
    target: tuple[int, int]  # (height, width) in pixels

    def time_ids(self) -> torch.Tensor:
        """The (6,) float tensor diffusers' SDXL pipeline passes as `time_ids`."""
        return torch.tensor([*self.original, *self.crop_top_left, *self.target], dtype=torch.float32)

    @classmethod
    def of(cls, values: list[int] | tuple[int, ...]) -> SizeConditioning:
        """From the six numbers as stored (`as_list`)."""
        if len(values) != TIME_IDS:
            raise ValueError(f"SDXL's size conditioning is {TIME_IDS} numbers, not {len(values)}")
        return cls((values[0], values[1]), (values[2], values[3]), (values[4], values[5]))

    def as_list(self) -> list[int]:
        return [*self.original, *self.crop_top_left, *self.target]


def pooled_width(config: Any) -> int | None:
    """The pooled text embedding's width a UNet takes (SDXL: 1280); None for a UNet without one (SD 1.x/2.x)."""
    if getattr(config, "addition_embed_type", None) != "text_time":
        return None
    width: int = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
    return width


def pack_pooled(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(b, n, d) token sequence and (b, p) pooled embedding -> (b, n + 1, d), the pooled one last, zero-padded."""
    batch, _, width = sequence.shape
    if pooled.shape[-1] > width:
        raise ValueError(f"a {pooled.shape[-1]}-wide pooled embedding does not fit a {width}-wide row")
    row = sequence.new_zeros(batch, 1, width)
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([sequence, row], dim=1)


def split_text(
    text: torch.Tensor, config: Any, time_ids: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """A packed text tensor -> the token sequence and the UNet's `added_cond_kwargs` (None for SD 1.x/2.x).

    The size numbers are constants of the clip: a null-text fit, which optimises the whole unconditional
    tensor, fits the sequence and the pooled row, and the padding after the pooled values gets no gradient.
    """
    width = pooled_width(config)
    if width is None:
        return text, None
    if time_ids is None:
        raise ValueError("an SDXL UNet needs the clip's size conditioning (time_ids)")
    batch = text.shape[0]
    added = {
        "text_embeds": text[:, -1, :width],
        "time_ids": time_ids.to(text.device, text.dtype).expand(batch, -1),
    }
    return text[:, :-1], added
