"""Local blending (Prompt-to-Prompt): an edit keeps the source outside the region its chosen words attend to.

For each frame, the chosen words' cross-attention at the blend layers (a quarter of the latent's side: 16x16
in SD at 512x512), summed over the words' tokens, averaged over heads and summed over layers and the steps so
far, gives a map A. Its region is

    R = (maxpool3x3(A) / max(maxpool3x3(A)) > 0.3)        (per frame, at the latent's size, nearest)

the mask M is the union of the source words' region in the source and the edit words' region in the edit,
and from step floor(0.2 N) on each step ends with  x = x_src + M * (x_edit - x_src).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from tavcli.errors import TavError
from tavcli.method.prompt_words import TokenMap
from tavcli.method.video_unet import split_heads

__all__ = ["LocalBlend", "replaced_word_maps", "word_maps"]


class LocalBlend:
    """The maps of one controlled edit's blend words (source words in the source, each prompt's edit words in
    its edit), accumulated as the sampling goes, and the mask they give."""

    threshold = 0.3  # Video-P2P's and Prompt-to-Prompt's
    start = 0.2  # the fraction of steps before blending starts

    def __init__(self, source_tokens: list[int], edit_tokens: list[list[int]], frames: int) -> None:
        self.source_tokens = source_tokens
        self.edit_tokens = edit_tokens  # per prompt; empty: that prompt's own region is not used
        self.frames = frames
        self.source_maps: torch.Tensor | None = None  # (frames, h, w) float32 sums
        self.edit_maps: list[torch.Tensor | None] = [None] * len(edit_tokens)

    def add_source(self, frames: torch.Tensor, maps: torch.Tensor) -> None:
        """Add one layer's map (len(frames), h, w) of the source words, for the clip's frames `frames`."""
        self.source_maps = self._added(self.source_maps, frames, maps)

    def add_edit(self, prompt: int, frames: torch.Tensor, maps: torch.Tensor) -> None:
        """Add one layer's map of prompt number `prompt`'s edit words."""
        self.edit_maps[prompt] = self._added(self.edit_maps[prompt], frames, maps)

    def _added(self, total: torch.Tensor | None, frames: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        if total is None:
            total = maps.new_zeros((self.frames, *maps.shape[1:]), dtype=torch.float32)
        return total.index_add(0, frames, maps.float())

    def blends(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` ends with blending."""
        return step >= int(self.start * steps)

    def source_region(self, size: tuple[int, int]) -> torch.Tensor | None:
        """The source words' region (frames, h, w) in {0, 1} at `size`, or None without source words."""
        return None if self.source_maps is None else _region(self.source_maps, size, self.threshold)

    def mask(self, prompt: int, size: tuple[int, int]) -> torch.Tensor:
        """Prompt `prompt`'s mask (frames, h, w) in {0, 1} at the latent's `size`: the union of the regions."""
        regions = [self.source_region(size)]
        edit = self.edit_maps[prompt]
        regions.append(None if edit is None else _region(edit, size, self.threshold))
        present = [region for region in regions if region is not None]
        if not present:  # the UNet has no layer at a quarter of the latent's side
            raise TavError("local blending found no cross-attention layer at a quarter of the latent's size")
        return torch.stack(present).amax(dim=0)

    def apply(self, latents: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`latents` (prompts, c, f, h, w) blended into `source` (1, c, f, h, w) by each prompt's mask."""
        size = (latents.shape[-2], latents.shape[-1])
        masks = torch.stack([self.mask(p, size) for p in range(len(latents))])[:, None].to(latents.dtype)
        return source + masks * (latents - source)


def _region(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Frames' maps (f, h', w') -> their regions (f, h, w): max-pooled 3x3, at `size`, normalised per frame,
    thresholded. A frame whose map is all zero (no attention at all) has no region, never 0/0."""
    pooled = F.max_pool2d(maps[:, None], kernel_size=3, stride=1, padding=1)
    resized = F.interpolate(pooled, size=size, mode="nearest")[:, 0]
    peak = resized.amax(dim=(1, 2), keepdim=True)
    return (resized > threshold * peak).float() * (peak > 0).float()


def word_maps(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, tokens: list[int], grid: tuple[int, int]
) -> torch.Tensor:
    """One item's attention to `tokens` at a layer of `grid` cells per frame (frames, h, w): summed over the
    tokens, averaged over heads."""
    maps: torch.Tensor = _probabilities(attn, q, k)[..., tokens].sum(dim=-1).mean(dim=1).unflatten(1, grid)
    return maps


def replaced_word_maps(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    q_src: torch.Tensor,
    k_src: torch.Tensor,
    tokens: list[int],
    token_map: TokenMap,
    grid: tuple[int, int],
) -> torch.Tensor:
    """`word_maps` of the maps the edit is given while its cross-attention is replaced (the token map's formula,
    P'[:, j] = w_j (a_j P_s[:, s_j] + (1 - a_j) P[:, j])), which is what Video-P2P's attention store holds then:
    it keeps the very tensor its controller overwrites."""
    chosen = torch.tensor(tokens, device=q.device)
    mixed = _probabilities(attn, q_src, k_src)[..., token_map.source[chosen]] * token_map.taken[chosen]
    if token_map.mode == "refine":  # words the edit added keep their own maps
        mixed = mixed + _probabilities(attn, q, k)[..., chosen] * token_map.own[chosen]
    maps: torch.Tensor = mixed.sum(dim=-1).mean(dim=1).unflatten(1, grid)
    return maps


def _probabilities(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention probabilities (rows, heads, n, m) of queries `q` over keys `k`, in float32."""
    heads = attn.heads
    scores = split_heads(q, heads).float() @ split_heads(k, heads).float().transpose(-1, -2) * attn.scale
    probabilities: torch.Tensor = scores.softmax(dim=-1)
    return probabilities
