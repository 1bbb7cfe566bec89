"""Tuning: encode the clip once, then train the attention projections on it (DESIGN.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin

from tavcli.model import VideoUNet, trainable_parameters
from tavcli.progress import Advance
from tavcli.runtime import Runtime

__all__ = ["TuneSettings", "decode_latents", "encode_clip", "train_delta", "training_target"]

VAE_CHUNK = 8  # frames per VAE call: bounds memory on long clips


@dataclass(frozen=True)
class TuneSettings:
    """The reference's defaults: 500 AdamW steps at lr 3e-5, seed 33."""

    steps: int = 500
    learning_rate: float = 3e-5
    seed: int = 33
    gradient_checkpointing: bool = False  # saves memory, same numbers: not part of the cache key


@torch.no_grad()
def encode_clip(vae: AutoencoderKL, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (f, h, w, 3) -> the VAE posterior's mean and std, each (1, c, f, h/8, w/8), unscaled."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
    dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(VAE_CHUNK)]
    mean = torch.cat([d.mean for d in dists]).float()
    std = torch.cat([d.std for d in dists]).float()
    return mean.transpose(0, 1).unsqueeze(0), std.transpose(0, 1).unsqueeze(0)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (1, c, f, h, w) -> uint8 frames (f, 8h, 8w, 3), decoded a few frames at a time."""
    frames = (latents[0].transpose(0, 1) / vae.config.scaling_factor).to(vae.dtype)
    pixels = torch.cat([vae.decode(chunk).sample for chunk in frames.split(VAE_CHUNK)])
    pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def train_delta(
    unet: VideoUNet,
    scheduler: SchedulerMixin,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    prompt_embeds: torch.Tensor,
    settings: TuneSettings,
    runtime: Runtime,
    advance: Advance,
) -> dict[str, torch.Tensor]:
    """Train `unet`'s tunable projections on one clip and return them by name.

    Each step samples a latent from the VAE posterior (mean + std * n), noises it at a uniformly
    random timestep and regresses the UNet output on the noise (or on the velocity for
    v-prediction models): the standard latent-diffusion loss with the reference's AdamW settings.
    """
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    params = trainable_parameters(unet)
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    unet.train()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # non-reentrant in diffusers: every tensor still gets a gradient
    optimizer = torch.optim.AdamW(
        params.values(), lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    generator = torch.Generator(runtime.device).manual_seed(settings.seed)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    for _ in range(settings.steps):
        latents = (latent_mean + latent_std * _randn(latent_mean, generator)) * scaling_factor
        noise = _randn(latents, generator)
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(noise_scheduler, latents, noise, timesteps)
        with runtime.autocast():
            prediction = unet(noisy, timesteps, prompt_embeds).sample
        loss = F.mse_loss(prediction.float(), target.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params.values(), max_norm=1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        advance(loss=loss.item())

    unet.eval()
    unet.disable_gradient_checkpointing()
    unet.requires_grad_(False)
    return {name: param.detach().clone() for name, param in params.items()}


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models (SD 2.x)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
