"""The VAE between pixels and latents: a clip's posterior once per project, edits' latents back to frames."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from tavcli.errors import TavError

__all__ = ["decode_latents", "encode_clip", "vae_frames"]

# The VAE's widest full-resolution activation per call, which sets how many frames go in one call.
CPU_VAE_BYTES = 16 * 2**20  # on a CPU, keep it cache-sized: ~1.6x faster decodes
GPU_VAE_BYTES = 512 * 2**20  # on a GPU, bound memory: 8 frames of SD at 512x512 in half precision, 3 at 768x768


@torch.no_grad()
def encode_clip(vae: AutoencoderKL, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (f, h, w, 3) -> the VAE posterior's mean and std, each (1, c, f, h/8, w/8), unscaled."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).to(vae.device) / 127.5 - 1
    chunks = pixels.split(vae_frames(vae, *pixels.shape[2:]))
    mean, std = torch.cat([_finite_or_fp32(vae, _posterior, chunk) for chunk in chunks]).chunk(2, dim=1)
    return mean.transpose(0, 1).unsqueeze(0), std.transpose(0, 1).unsqueeze(0)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (1, c, f, h, w) -> uint8 frames (f, 8h, 8w, 3), decoded a few frames at a time."""
    frames = latents[0].transpose(0, 1) / vae.config.scaling_factor
    height, width = frames.shape[2] * 8, frames.shape[3] * 8
    chunks = frames.split(vae_frames(vae, height, width))
    pixels = torch.cat([_finite_or_fp32(vae, _pixels, chunk) for chunk in chunks])
    if not torch.isfinite(pixels).all():  # clamping would turn them into black frames
        raise TavError(
            "the VAE decoded NaN or inf pixels; nothing was written",
            "the latents are out of range: try a lower --guidance, or --precision fp32",
        )
    pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior's mean and std, stacked on the channel axis."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)


def _pixels(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    pixels: torch.Tensor = vae.decode(latents.to(vae.dtype)).sample
    return pixels


def _finite_or_fp32(
    vae: AutoencoderKL, call: Callable[[AutoencoderKL, torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """`call(vae, inputs)` in float32, run again with the VAE in fp32 if its half-precision result
    overflowed to inf or NaN.

    A half-precision VAE is fast and nearly always fine, but its activations can exceed fp16's
    range (black frames: the most common complaint about SD in fp16); fp32 is the fallback.
    """
    out = call(vae, inputs).float()
    if vae.dtype == torch.float32 or torch.isfinite(out).all():
        return out
    dtype = vae.dtype
    vae.to(torch.float32)
    try:  # fp32 activations are twice the size: fewer frames per call
        height, width = out.shape[2:] if call is _pixels else inputs.shape[2:]
        return torch.cat([call(vae, chunk).float() for chunk in inputs.split(vae_frames(vae, height, width))])
    finally:
        vae.to(dtype)


def vae_frames(vae: AutoencoderKL, height: int, width: int) -> int:
    """How many frames of `height` x `width` pixels the VAE encodes or decodes per call (each frame is
    independent), from the size of its widest full-resolution activation in the VAE's dtype."""
    element = torch.finfo(vae.dtype).bits // 8
    per_frame: int = height * width * vae.config.block_out_channels[0] * element
    budget = CPU_VAE_BYTES if vae.device.type == "cpu" else GPU_VAE_BYTES
    return max(1, budget // per_frame)
