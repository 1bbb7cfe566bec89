"""The null-text fit's memory: each UNet call it back-propagates through keeps only its inputs (its activations
are recomputed in backward, one window's at a time), and that changes no number of the fit."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import pytest
import torch

from tavcli.method.inversion import ddim_inversion
from tavcli.method.null_text import NullTextRun, NullTextState, optimise_null_text
from tavcli.method.sampling import Guidance
from tavcli.method.video_unet import VideoUNet, inflate_unet
from tavcli.method.windows import windowed

from .test_memory import LiveBytes

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, UNet2DConditionModel

FRAMES, WINDOW = 10, 3  # five windows of 3 frames (frame 0 and two more)
ONE_ITERATION = NullTextRun(guidance=Guidance(7.5), iterations=1)


@pytest.fixture(scope="module")
def unet(oracle_unet2d: UNet2DConditionModel) -> VideoUNet:
    """A video UNet as the session holds a tuned one: every weight requires a gradient."""
    return inflate_unet(oracle_unet2d, seed=0).eval()


@pytest.fixture(scope="module")
def frozen(oracle_unet2d: UNet2DConditionModel) -> VideoUNet:
    """The same UNet as the workflow's fit runs it: no weight requires a gradient."""
    return inflate_unet(oracle_unet2d, seed=0).eval().requires_grad_(False)


def _inputs(unet: Any, scheduler: DDIMScheduler, frames: int, steps: int) -> tuple[list[torch.Tensor], ...]:
    """An inversion's trajectory of seeded latents, and seeded source and empty prompt embeddings."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, frames, 8, 8, generator=generator)
    prompt, empty = torch.randn(2, 1, 77, 32, generator=generator)
    return ddim_inversion(unet, scheduler, latents, prompt, steps), [prompt, empty]


def _fit(unet: Any, scheduler: DDIMScheduler, frames: int, steps: int, run: NullTextRun, **kw: Any) -> NullTextState:
    trajectory, (prompt, empty) = _inputs(unet, scheduler, frames, steps)
    return optimise_null_text(unet, scheduler, trajectory, prompt, empty, run, **kw)


def _saved_bytes(unet: VideoUNet, work: Any) -> int:
    """Bytes autograd keeps for backward while `work()` runs, each storage once, the UNet's weights left out
    (saved by reference). Inside a checkpointed call torch's own hooks take over: what is counted is kept."""
    weights = {param.untyped_storage().data_ptr() for param in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        work()
    return sum(saved.values())


def _one_call(unet: VideoUNet, frames: int) -> None:
    """One UNet call on `frames` frames differentiated with respect to its text, as the fit's unconditional one."""
    text = torch.randn(1, 77, 32, requires_grad=True)
    out = unet(torch.randn(1, 4, frames, 8, 8), torch.tensor(500), text).sample
    torch.autograd.grad(out.square().sum(), [text])


def test_a_fit_iteration_keeps_the_inputs_of_its_calls_not_their_activations(
    frozen: VideoUNet, scheduler: DDIMScheduler
) -> None:
    one_window = _saved_bytes(frozen, lambda: _one_call(frozen, WINDOW))
    fit = _saved_bytes(frozen, lambda: _fit(windowed(frozen, WINDOW), scheduler, FRAMES, 1, ONE_ITERATION))
    # Measured (CPU, tiny UNet): one window's call keeps 9.5 MB; one iteration over the five windows kept
    # 47.7 MB before checkpointing, 0.05 MB with it.
    assert fit < 0.01 * one_window, (fit, one_window)
    with LiveBytes() as call:
        _one_call(frozen, WINDOW)
    trajectory, (prompt, empty) = _inputs(windowed(frozen, WINDOW), scheduler, FRAMES, 1)
    with LiveBytes(*trajectory, prompt, empty) as iteration:
        optimise_null_text(windowed(frozen, WINDOW), scheduler, trajectory, prompt, empty, ONE_ITERATION)
    # One window's recomputed activations at a time: 15.2 MB against one call's 15.0 (53.3 MB before).
    assert iteration.peak < 1.2 * call.peak, (iteration.peak, call.peak)


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointed_calls_on_frozen_weights_change_no_number_of_the_fit(
    unet: VideoUNet, frozen: VideoUNet, scheduler: DDIMScheduler, window: int | None, precision: str
) -> None:
    """Against the fit as it was: every activation kept, gradients recorded for the weights too."""
    run = NullTextRun(guidance=Guidance(7.5, guidance_rescale=0.3), iterations=4, learning_rate=0.1)
    autocast: AbstractContextManager[object] = (
        nullcontext() if precision == "fp32" else torch.autocast("cpu", dtype=torch.bfloat16)
    )
    with autocast:
        now = _fit(windowed(frozen, window), scheduler, 6, 3, run)
        before = _fit(windowed(unet, window), scheduler, 6, 3, run, checkpointing=False)
    assert torch.equal(torch.stack(now.embeddings), torch.stack(before.embeddings))
    assert torch.equal(now.latent, before.latent)
    assert (now.losses, now.iterations) == (before.losses, before.iterations)
    assert now.iterations == [4, 4, 4]  # every step ran Adam more than once
