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
from functools import partial

import torch
from diffusers import DDIMScheduler

from tavcli.method.attention_control import AttentionControl
from tavcli.method.inversion import UNetCall
from tavcli.method.sampling import Guidance, guided_step

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
    embedding `prompt` (1, n, d) it was inverted with. The trajectory may stay on the host: each step moves the
    one latent it uses to the prompt's device."""

    trajectory: torch.Tensor
    prompt: torch.Tensor


class AttentionSteering:
    """Runs the source call before each step of a controlled edit of `prompts` prompts (its guided batch
    `[uncond x prompts, cond x prompts]`), and local blending after it; a source branch steps at `guidance`."""

    def __init__(
        self,
        unet: UNetCall,
        control: AttentionControl,
        source: SourceBranch | SourceTrajectory,
        prompts: int,
        guidance: Guidance,
    ) -> None:
        steps = control.schedule.steps
        if isinstance(source, SourceTrajectory) and len(source.trajectory) != steps + 1:
            raise ValueError(f"a trajectory of {len(source.trajectory) - 1} steps for an edit of {steps}")
        self.unet, self.control, self.source, self.prompts = unet, control, source, prompts
        self.guidance = guidance  # the edit's: the branch is sampled as the edit is
        self.device = source.prompt.device  # where the source's latents are used
        # The source's latent before the current step (the branch's), or after it (what blending blends into).
        start = source.noise if isinstance(source, SourceBranch) else source.trajectory[-1]
        self.source_latents = start.to(self.device)
        self._moved: tuple[int, torch.Tensor] | None = None  # the trajectory's latent the current step uses

    def begin(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        control, schedule = self.control, self.control.schedule
        control.step = index
        control.before_replay = None
        if isinstance(self.source, SourceBranch):
            if schedule.maps_needed(index) or schedule.blend is not None:  # blending blends into its latents
                self.record_source(ddim, index, timestep, step)
        else:
            self.source_latents = self._trajectory_latents(index)
            if schedule.maps_needed(index):  # each edit call records its source call just before it runs

                def record_window(number: int) -> None:
                    control.recorded.clear()  # one window's queries and keys held at a time
                    control.record_call(number, partial(self._trajectory_call, index, timestep, number))

                control.before_replay = record_window
        control.begin("replay", edit_items=tuple(range(self.prompts, 2 * self.prompts)))

    def record_source(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        """The source's calls of step `index`, all of them: its controlled layers keep their queries and keys."""
        control, source = self.control, self.source
        control.step = index
        if isinstance(source, SourceBranch):
            control.begin("record", record_item=1)  # the conditional half of [uncond, cond]
            self.source_latents = guided_step(
                self.unet, ddim, self.source_latents, timestep, step, source.text(index), self.guidance
            )
        else:
            control.begin("record")
            for number in range(len(control.spans)):
                control.record_call(number, partial(self._trajectory_call, index, timestep, number))
        control.begin("off")

    def _at(self, index: int) -> int:
        """The trajectory's latent that the inversion's call at edit step `index`'s timestep started from."""
        return len(self.source.trajectory) - 2 - index if isinstance(self.source, SourceTrajectory) else 0

    def _trajectory_latents(self, index: int) -> torch.Tensor:
        """The trajectory's latent of edit step `index` on the device: moved once for all the step's calls."""
        assert isinstance(self.source, SourceTrajectory)
        at = self._at(index)
        if self._moved is None or self._moved[0] != at:
            self._moved = at, self.source.trajectory[at].to(self.device)
        return self._moved[1]

    def _trajectory_call(self, index: int, timestep: torch.Tensor, number: int) -> None:
        """The inversion's call at this timestep, on the frames of call `number` (the UNet itself, not windowed:
        the windows are the edit's, called one by one)."""
        assert isinstance(self.source, SourceTrajectory)
        latents = self._trajectory_latents(index)
        frames = self.control.span(number, latents.device)
        unet = getattr(self.unet, "unet", self.unet)  # a `WindowedUNet`'s own UNet
        unet(latents[:, :, frames], timestep, self.source.prompt)

    def end(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        self.control.begin("off")
        blend = self.control.schedule.blend
        if blend is None or not blend.blends(index, self.control.schedule.steps):
            return latents
        return blend.apply(latents, self.source_latents.to(latents.dtype))
