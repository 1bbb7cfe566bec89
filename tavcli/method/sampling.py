"""DDIM sampling with classifier-free guidance, as the reference pipeline does it.

Each step runs the UNet once on a doubled batch `[uncond, cond]` and combines the two predictions:

    pred = pred_uncond + w * (pred_cond - pred_uncond)                (w: `Guidance.guidance`)
    pred = r * pred * std(pred_cond) / std(pred) + (1 - r) * pred     (r: `Guidance.guidance_rescale`, r > 0 only)
    x    = DDIMScheduler.step(pred, t, x, eta)                        (eta = 0: deterministic DDIM)

The rescale (Lin et al. 2023, section 3.4) is diffusers' `rescale_noise_cfg`; its std runs per batch item,
over channels, frames and pixels. The first two lines are `Guidance.apply`, the one place they are computed:
plain sampling, the source branch of attention control and the null-text fit all take one `Guidance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from tavcli.method.inversion import StepCallback, UNetCall
from tavcli.method.windows import UNetExtra, controlled_call

__all__ = ["Guidance", "Steering", "ddim_sample", "ddim_schedule", "guided_step"]


class Steering(Protocol):
    """Work around each sampling step (attention control, `tavcli.method.controlled_sampling`)."""

    def begin(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        """Before step `index` (0-based) at `timestep` (`step` as an int)."""

    def end(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """After step `index`: the latents it gave, or what replaces them."""
        ...


def ddim_schedule(scheduler: SchedulerMixin, num_steps: int, device: torch.device) -> tuple[DDIMScheduler, list[int]]:
    """A DDIM scheduler of `num_steps` steps from the model's config, and its timesteps as ints.

    The scheduler's step gets the timestep as an int, read once per run: it looks its CPU alphas up with
    it, and a device tensor would be read back at each of six lookups per step. The UNet and the control
    keep the device tensor (`ddim.timesteps`).
    """
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps, device=device)
    return ddim, ddim.timesteps.tolist()


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: the scale w and the rescale r of the formula above. The fields are named as the
    edit settings name them (`--guidance`, `--guidance-rescale`), so the workflow builds one by name."""

    guidance: float
    guidance_rescale: float = 0.0

    def apply(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        """The guided prediction of the formula above, rescaled when `guidance_rescale` > 0."""
        pred = pred_uncond + self.guidance * (pred_cond - pred_uncond)
        if self.guidance_rescale > 0:  # lazy for start-up: the pipeline module costs 1.5 s to import
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale=self.guidance_rescale)
        return pred


def guided_step(
    unet: UNetCall,
    ddim: DDIMScheduler,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    step: int,
    text: torch.Tensor,
    guidance: Guidance,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    control: UNetExtra | None = None,
) -> torch.Tensor:
    """One guided DDIM step from `latents` at `timestep` (`step` as an int): the UNet once on the doubled
    batch `[latents, latents]` with `text` = `[uncond, cond]` embeddings, `guidance` applied, then the
    scheduler's step."""
    model_input = ddim.scale_model_input(torch.cat([latents, latents]), timestep)
    pred_uncond, pred_cond = controlled_call(unet, model_input, timestep, text, control).sample.chunk(2)
    pred = guidance.apply(pred_uncond, pred_cond)
    next_latents: torch.Tensor = ddim.step(pred, step, latents, eta=eta, generator=generator).prev_sample
    return next_latents


@torch.no_grad()
def ddim_sample(
    unet: UNetCall,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
    num_steps: int,
    guidance: Guidance,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    control: UNetExtra | None = None,
    steering: Steering | None = None,
) -> torch.Tensor:
    """Denoise `latents` (b, c, f, h, w) from pure noise to clean latents and return them.

    `prompt_embeds` and `negative_prompt_embeds` are (b, n, d); the negative embedding is the
    unconditional branch (the empty prompt's embedding unless the user gave a negative prompt), or one
    such embedding per step (null-text inversion's, `tavcli.method.null_text`). `eta > 0` adds DDIM's
    stochastic term, drawn from `generator`. `control(x, t, text)` returns extra UNet arguments for each
    call (ControlNet residuals, see `tavcli.method.control.ControlGuide`). `guidance` combines the two
    predictions of each step (`Guidance.apply`). `steering` works around each step.
    """
    ddim, steps = ddim_schedule(scheduler, num_steps, latents.device)
    if isinstance(negative_prompt_embeds, torch.Tensor):
        texts: Sequence[torch.Tensor] = [torch.cat([negative_prompt_embeds, prompt_embeds])] * num_steps
    elif len(negative_prompt_embeds) == num_steps:
        texts = [torch.cat([uncond.expand_as(prompt_embeds), prompt_embeds]) for uncond in negative_prompt_embeds]
    else:
        raise ValueError(f"{len(negative_prompt_embeds)} unconditional embeddings for {num_steps} steps")
    for index, (timestep, step, text) in enumerate(zip(ddim.timesteps, steps, texts, strict=True)):
        if steering is not None:
            steering.begin(ddim, index, timestep, step)
        latents = guided_step(
            unet, ddim, latents, timestep, step, text, guidance, eta=eta, generator=generator, control=control
        )
        if steering is not None:
            latents = steering.end(index, latents)
        if on_step is not None:
            on_step(index + 1, num_steps)
    return latents
