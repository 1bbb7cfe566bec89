"""DDIM inversion: from a clip's clean latents to the noise that regenerates its structure.

Each step k walks the DDIM schedule upwards, from timestep s = t_k - T/N to t_k, asking the model for
its prediction **at the destination t_k** from the current latent x (the reference's choice):

    eps  = model(x, t_k, prompt)              (v-prediction output converted to eps)
    x0   = (x - sqrt(1 - a_s) * eps) / sqrt(a_s)
    x'   = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps

with `a` the cumulative alphas and a_s = `alphas_cumprod[0]` (or 1) when s < 0. That is exactly
`diffusers.DDIMInverseScheduler.step` for noise-predicting models, which this module calls. A
v-prediction output is converted here, with the alphas of t_k where the model was asked
(eps = sqrt(a_t) * v + sqrt(1 - a_t) * x): the inverse scheduler would convert it with a_s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, SchedulerMixin

__all__ = ["StepCallback", "UNetCall", "ddim_inversion"]

UNetCall = Callable[..., Any]
"""A video UNet, or `windows.WindowedUNet` running one over windows: (sample, t, text, **extra) -> .sample"""
StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in all)."""


@torch.no_grad()
def ddim_inversion(
    unet: UNetCall,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    num_steps: int,
    on_step: StepCallback | None = None,
) -> list[torch.Tensor]:
    """Invert `latents` with DDIM and return every latent, from the clean input to the noisiest.

    Args:
        unet: the (tuned) video UNet.
        scheduler: the model's scheduler; its config builds the inverse DDIM schedule.
        latents: (b, c, f, h, w) clean latents, already multiplied by the VAE's scaling factor.
        prompt_embeds: (b, n, d) text embedding, normally of the empty prompt; no guidance is used.
        num_steps: number of DDIM steps N.
        on_step: optional progress callback.

    Returns:
        N + 1 tensors shaped like `latents`: `[0]` is the input, `[-1]` the noise used for editing.
    """
    inverse = DDIMInverseScheduler.from_config(scheduler.config, prediction_type="epsilon")
    velocity = scheduler.config.prediction_type == "v_prediction"
    inverse.set_timesteps(num_steps, device=latents.device)
    # Per-run constants, so that a step reads nothing back from the device: the scheduler's step gets
    # the timestep as an int (a device tensor is read back at each of its four alpha lookups), and the
    # v-prediction conversion its alphas on the device, indexed by that int.
    steps = inverse.timesteps.tolist()
    alphas = inverse.alphas_cumprod.to(latents.device, torch.float32) if velocity else None
    trajectory = [latents]
    for done, (timestep, step) in enumerate(zip(inverse.timesteps, steps, strict=True), start=1):
        model_output = unet(trajectory[-1], timestep, prompt_embeds).sample
        if alphas is not None:
            model_output = _noise_from_velocity(alphas[step], model_output, trajectory[-1])
        trajectory.append(inverse.step(model_output, step, trajectory[-1]).prev_sample)
        if on_step is not None:
            on_step(done, num_steps)
    return trajectory


def _noise_from_velocity(alpha: torch.Tensor, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The noise a v-prediction model predicts for `sample` at cumulative alpha a: sqrt(a) v + sqrt(1 - a) x."""
    return alpha.sqrt() * velocity + (1 - alpha).sqrt() * sample
