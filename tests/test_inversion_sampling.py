"""DDIM inversion against the reference, and the guidance batching of DDIM sampling."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from tavcli.method.inversion import ddim_inversion
from tavcli.method.sampling import Guidance, ddim_sample

from .conftest import ORACLE

if TYPE_CHECKING:
    from tavcli.method.video_unet import VideoUNet


def test_inversion_reproduces_reference(
    oracle_video_unet: VideoUNet, scheduler: DDIMScheduler, embed: Callable[[str], torch.Tensor]
) -> None:
    reference = load_file(ORACLE / "ddim_inversion_empty.safetensors")
    trajectory = ddim_inversion(oracle_video_unet, scheduler, reference["latent_in"], embed(""), 10)
    assert len(trajectory) == 11
    assert torch.equal(trajectory[0], reference["latent_in"])
    assert (trajectory[-1] - reference["empty.final"]).abs().max().item() <= 1e-4


def test_inversion_feeds_the_reference_timesteps(
    oracle_video_unet: VideoUNet, scheduler: DDIMScheduler, embed: Callable[[str], torch.Tensor]
) -> None:
    reference = load_file(ORACLE / "ddim_inversion_empty.safetensors")
    seen: list[int] = []

    def spy(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(int(args[1]))

    handle = oracle_video_unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ddim_inversion(oracle_video_unet, scheduler, reference["latent_in"], embed(""), 10)
    finally:
        handle.remove()
    assert seen == reference["empty.unet_timesteps"].tolist()


def test_guidance_batches_negative_then_prompt(
    oracle_video_unet: VideoUNet, scheduler: DDIMScheduler, embed: Callable[[str], torch.Tensor]
) -> None:
    noise = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    cat, dog, empty = embed("a cat"), embed("a dog"), embed("")

    def sample(prompt: torch.Tensor, negative: torch.Tensor, guidance: float) -> torch.Tensor:
        return ddim_sample(oracle_video_unet, scheduler, noise, prompt, negative, 3, Guidance(guidance))

    # guidance 1 keeps only the prompt's branch, guidance 0 only the negative's.
    assert torch.allclose(sample(cat, empty, 1.0), sample(cat, dog, 1.0), atol=1e-5)
    assert torch.allclose(sample(cat, empty, 0.0), sample(dog, empty, 0.0), atol=1e-5)
    assert not torch.allclose(sample(cat, empty, 7.5), sample(dog, empty, 7.5), atol=1e-3)


class _StandIn(torch.nn.Module):
    """A deterministic stand-in UNet predicting noise, or the velocity that noise means at the asked timestep."""

    def __init__(self, alphas: torch.Tensor, velocity: bool) -> None:
        super().__init__()
        self.alphas, self.velocity = alphas, velocity

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> SimpleNamespace:
        noise = 0.3 * x + torch.sin(x * (1 + int(t) / 100))
        if not self.velocity:
            return SimpleNamespace(sample=noise)
        a = self.alphas[int(t)]
        return SimpleNamespace(sample=(noise - (1 - a).sqrt() * x) / a.sqrt())  # so that eps = sqrt(a) v + sqrt(1-a) x


def test_a_v_prediction_model_inverts_like_its_noise_predicting_equivalent(scheduler: DDIMScheduler) -> None:
    """The output is converted with the alphas of the timestep the model was asked at (docs/method.md, "Inversion")."""
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    v_scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    text = torch.zeros(1, 77, 32)
    noise_model = _StandIn(scheduler.alphas_cumprod, velocity=False)
    velocity_model = _StandIn(scheduler.alphas_cumprod, velocity=True)
    expected = ddim_inversion(noise_model, scheduler, latents, text, 10)
    found = ddim_inversion(velocity_model, v_scheduler, latents, text, 10)
    assert all(torch.allclose(e, f, atol=1e-4) for e, f in zip(expected, found, strict=True))
