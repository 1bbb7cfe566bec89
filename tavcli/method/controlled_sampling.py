"""Sampling an edit under attention control (`ddim_sample`'s steering): before each step the source call,
after it local blending (docs/method.md, "Attention control").

The source's attention comes from one of two places:

- `SourceBranch` (Video-P2P): the source clip re-created beside the edit, from the inverted noise with the
  source prompt and the unconditional branch that reconstructs it (null-text's embeddings per step, or the
  source prompt's for negative-prompt inversion): one guided step of its own per edit step, its conditional
  half recorded.
- `SourceTrajectory` (FateZero, without storing its maps): at edit step i, at timestep t_i, the inversion's
  own call at t_i, UNet(z*_{N-1-i}, t_i, c_inv), on the cached trajectory z*_0 .. z*_N. The maps FateZero
  stores during inversion are this call's, so nothing is stored: one extra UNet item per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from tavcli.method.attention_control import AttentionControl
from tavcli.method.inversion import UNetCall
from tavcli.method.sampling import guided_step

__all__ = ["AttentionSteering", "SourceBranch", "SourceTrajectory"]


@dataclass(frozen=True)
class SourceBranch:
    """The source sampled beside the edit: from `noise` (1, c, f, h, w), with `prompt` (1, n, d) and the
    unconditional embedding of each step (one tensor for all steps, or one per step)."""

    noise: torch.Tensor
    prompt: torch.Tensor
    unconditional: torch.Tensor | Sequence[torch.Tensor]

    def text(self, index: int) -> torch.Tensor:
        uncond = self.unconditional if isinstance(self.unconditional, torch.Tensor) else self.unconditional[index]
        return torch.cat([uncond.expand_as(self.prompt), self.prompt])


@dataclass(frozen=True)
class SourceTrajectory:
    """The cached inversion: `trajectory` (N + 1, 1, c, f, h, w) from the clean latents to the noise, and the
    embedding `prompt` (1, n, d) it was inverted with."""

    trajectory: torch.Tensor
    prompt: torch.Tensor


class AttentionSteering:
    """Runs the source call before each step of a controlled edit of `prompts` prompts (its guided batch
    `[uncond x prompts, cond x prompts]`), and local blending after it."""

    def __init__(
        self,
        unet: UNetCall,
        control: AttentionControl,
        source: SourceBranch | SourceTrajectory,
        prompts: int,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
    ) -> None:
        steps = control.schedule.steps
        if isinstance(source, SourceTrajectory) and len(source.trajectory) != steps + 1:
            raise ValueError(f"a trajectory of {len(source.trajectory) - 1} steps for an edit of {steps}")
        self.unet, self.control, self.source, self.prompts = unet, control, source, prompts
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        # The source's latent before the current step (the branch's), or after it (what blending blends into).
        self.source_latents = source.noise if isinstance(source, SourceBranch) else source.trajectory[-1]

    def begin(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        self.control.step = index
        if self.control.schedule.source_needed(index):
            self.record_source(ddim, index, timestep, step)
        self.control.begin("replay", edit_items=tuple(range(self.prompts, 2 * self.prompts)))

    def record_source(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        """The source call of step `index`: its controlled layers keep their queries and keys."""
        self.control.step = index
        source = self.source
        if isinstance(source, SourceBranch):
            self.control.begin("record", record_item=1)  # the conditional half of [uncond, cond]
            self.source_latents = guided_step(
                self.unet, ddim, self.source_latents, timestep, step, source.text(index), self.guidance_scale,
                guidance_rescale=self.guidance_rescale,
            )  # fmt: skip
        else:
            self.control.begin("record", record_item=0)
            at = len(source.trajectory) - 2 - index  # the inversion's call at this timestep: from z*_{N-1-i}
            self.unet(source.trajectory[at], timestep, source.prompt)
            self.source_latents = source.trajectory[at]
        self.control.begin("off")

    def end(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        self.control.begin("off")
        blend = self.control.schedule.blend
        if blend is None or not blend.blends(index, self.control.schedule.steps):
            return latents
        return blend.apply(latents, self.source_latents.to(latents.dtype))
