"""Null-text inversion (Mokady et al., CVPR 2023): unconditional embeddings that make guided DDIM sampling
retrace a DDIM inversion, so the source prompt gives the source clip back.

With N steps, guidance w, the inversion's trajectory `z*_0 .. z*_N` (clean to noisiest) made with the
source prompt's embedding c, and `z_0 = z*_N`, for i = 0 .. N-1 in sampling order:

    u_i   = argmin_u  | step_w(z_i, t_i; u, c) - z*_{N-1-i} |^2      (Adam, from u_{i-1}; u_{-1} = empty prompt)
    z_i+1 = step_w(z_i, t_i; u_i, c)

where `step_w` is the guided DDIM step sampling takes (`tavcli.method.sampling.guided_step`, at the run's
`Guidance`: its rescale included). Each u_i is (1, n, d), shared by every frame of the clip. Adam runs at most
`iterations` times per step at lr = `learning_rate` * (1 - i / max(100, 2N)) and stops once the loss is
below 1e-5 + i * 2e-5: at N = 50 the paper's schedule exactly, and for longer schedules it still ends
near half the first rate instead of going negative. The next latent is computed by the very call that
sampling makes, so sampling with the source prompt and these u_i gives the trajectory they were fitted
on; a sampled edit with another prompt keeps what that prompt does not change.

Memory: each UNet call that Adam differentiates keeps only its inputs for backward, which recomputes
its activations (`torch.utils.checkpoint`): per window when the UNet runs over windows, so backward
holds one window's activations instead of every window's. It costs one more forward per Adam iteration
and changes no number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import SchedulerMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch.utils.checkpoint import checkpoint

from tavcli.method.inversion import UNetCall
from tavcli.method.sampling import Guidance, ddim_schedule, guided_step
from tavcli.method.windows import WindowedUNet

__all__ = ["NullTextRun", "NullTextState", "checkpointed", "optimise_null_text"]

TOLERANCE, TOLERANCE_PER_STEP = 1e-5, 2e-5  # the paper's early stop: loss < 1e-5 + i * 2e-5
ADAM_EPS = 1e-8  # torch's and the paper's, for the mean squared error's gradient


@dataclass(frozen=True, kw_only=True)
class NullTextRun:
    """What determines the optimisation besides the model and the trajectory: guidance and Adam's budget."""

    guidance: Guidance
    iterations: int = 10
    learning_rate: float = 1e-2

    def rate(self, index: int, steps: int) -> float:
        """Adam's learning rate at sampling step `index` of `steps`."""
        return self.learning_rate * (1 - index / max(100, 2 * steps))


@dataclass
class NullTextState:
    """The steps done: each one's unconditional embedding and final loss, and the latent reached (z_k)."""

    latent: torch.Tensor
    embeddings: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.embeddings)


StepDone = Callable[[NullTextState], None]
IterationDone = Callable[[int, float], None]


def optimise_null_text(
    unet: UNetCall,
    scheduler: SchedulerMixin,
    trajectory: Sequence[torch.Tensor],
    prompt_embeds: torch.Tensor,
    empty_embeds: torch.Tensor,
    run: NullTextRun,
    state: NullTextState | None = None,
    on_step: StepDone | None = None,
    on_iteration: IterationDone | None = None,
    checkpointing: bool = True,
) -> NullTextState:
    """The unconditional embedding of every sampling step (see the module's formula).

    Args:
        unet: the (tuned) video UNet, or a windowed one; its weights are not trained.
        scheduler: the model's scheduler.
        trajectory: the inversion's N + 1 latents (b = 1), clean first, made with `prompt_embeds`.
        prompt_embeds: (1, n, d) the source prompt's embedding c.
        empty_embeds: (1, n, d) the empty prompt's embedding: where u_0's optimisation starts.
        run: guidance and Adam's budget.
        state: the steps done by an interrupted run, to go on from; None starts at z*_N.
        on_step: called with the state after each step (to save it: the run can resume from any step).
        on_iteration: called with (iteration, loss) after each Adam iteration.
        checkpointing: recompute the activations of the differentiated UNet calls in backward
            (`checkpointed`); False keeps them all, as the reference does, to the same numbers.

    Returns:
        The state after all N steps: `embeddings[i]` is u_i in float32, `losses[i]` the squared error of
        z_{i+1} against z*_{N-1-i} per element, `iterations[i]` the Adam iterations step i took.

    Raises:
        FloatingPointError: a loss, embedding or latent is NaN or inf; `on_step` has seen only finite steps.
    """
    steps = len(trajectory) - 1
    ddim, timesteps = ddim_schedule(scheduler, steps, trajectory[-1].device)
    state = state or NullTextState(latent=trajectory[-1])
    fitted = checkpointed(unet) if checkpointing else unet
    for index in range(state.done, steps):
        timestep, step, target = ddim.timesteps[index], timesteps[index], trajectory[steps - 1 - index].float()
        start = state.embeddings[-1] if state.embeddings else empty_embeds
        uncond, taken = _fit(
            fitted, ddim, state.latent, timestep, step, prompt_embeds, start, target, run, index, on_iteration
        )
        with torch.no_grad():
            text = torch.cat([uncond.to(prompt_embeds.dtype), prompt_embeds])
            latent = guided_step(unet, ddim, state.latent, timestep, step, text, run.guidance)
        loss = torch.nn.functional.mse_loss(latent.float(), target).item()
        _require_finite(uncond, loss, index)  # before `on_step` saves it: a rerun resumes from the step before
        state.latent = latent
        state.embeddings.append(uncond)
        state.losses.append(loss)
        state.iterations.append(taken)
        if on_step is not None:
            on_step(state)
    return state


def checkpointed(unet: UNetCall) -> UNetCall:
    """`unet` with each UNet call checkpointed: inside the windows when it runs over windows, so that backward
    recomputes (and holds) one window's activations at a time, not the whole call's."""
    if isinstance(unet, WindowedUNet):
        return WindowedUNet(_Checkpointed(unet.unet), unet.windows)
    return _Checkpointed(unet)


class _Checkpointed:
    """A UNet call that keeps only its inputs for backward while autograd records, and runs as is otherwise."""

    def __init__(self, unet: UNetCall) -> None:
        self.unet = unet

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> UNet2DConditionOutput:
        if not torch.is_grad_enabled():  # the conditional prediction and the step taken: nothing to recompute
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        # Non-reentrant: the recomputation runs under the autocast and RNG state of the first pass.
        out = checkpoint(self._sample, sample, timestep, encoder_hidden_states, use_reentrant=False, **kwargs)
        return UNet2DConditionOutput(sample=out)

    def _sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        sample: torch.Tensor = self.unet(*args, **kwargs).sample
        return sample


def _require_finite(uncond: torch.Tensor, loss: float, index: int) -> None:
    """FloatingPointError if step `index`'s embedding or loss is NaN or inf (a non-finite latent makes its loss
    so): no loss checks the embedding Adam's last update made."""
    if not math.isfinite(loss) or not bool(torch.isfinite(uncond).all()):
        raise FloatingPointError(f"the null-text embedding or latent is not finite after step {index + 1}")


def _fit(
    unet: UNetCall,
    ddim: SchedulerMixin,
    latent: torch.Tensor,
    timestep: torch.Tensor,
    step: int,
    prompt_embeds: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    run: NullTextRun,
    index: int,
    on_iteration: IterationDone | None,
) -> tuple[torch.Tensor, int]:
    """Adam on one step's unconditional embedding, from `start`: the embedding (float32) and the iterations run.

    The conditional prediction does not depend on u: it is computed once. Only u gets a gradient
    (`torch.autograd.grad`), so the UNet's weights accumulate nothing. The gradient is taken of the summed
    error, and Adam's eps scaled alike (Adam's step is the same for gradient and eps scaled together): the
    mean's gradient per element (about 1e-7 near the tolerance) would round to zero in fp16.
    """
    model_input = ddim.scale_model_input(latent, timestep)
    with torch.no_grad():
        pred_cond = unet(model_input, timestep, prompt_embeds).sample
    uncond = start.detach().float().clone().requires_grad_(True)
    scale = target.numel()
    optimiser = torch.optim.Adam([uncond], lr=run.rate(index, len(ddim.timesteps)), eps=ADAM_EPS * scale)
    taken = 0
    for taken in range(1, run.iterations + 1):
        pred_uncond = unet(model_input, timestep, uncond.to(prompt_embeds.dtype)).sample
        pred = run.guidance.apply(pred_uncond, pred_cond)
        previous = ddim.step(pred, step, latent).prev_sample
        loss = torch.nn.functional.mse_loss(previous.float(), target)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the null-text loss is not finite at step {index + 1}, iteration {taken}")
        (uncond.grad,) = torch.autograd.grad(loss * scale, [uncond])
        optimiser.step()
        if on_iteration is not None:
            on_iteration(taken, value)
        if value < TOLERANCE + index * TOLERANCE_PER_STEP:
            break
    return uncond.detach(), taken
