"""The VAE between pixels and latents: a clip's posterior once per project, edits' latents back to frames."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from tavcli.errors import TavError

__all__ = ["decode_latents", "encode_clip", "vae_frames"]

GPU_VAE_FRAMES = 8  # frames per VAE call on a GPU: bounds memory on long clips


CPU_VAE_BYTES = 16 * 2**20  # on a CPU, keep the VAE's largest activation cache-sized: ~1.6x faster decodes


@torch.no_grad()
def encode_clip(vae: AutoencoderKL, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (f, h, w, 3) -> the VAE posterior's mean and std, each (1, c, f, h/8, w/8), unscaled."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
    dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(vae_frames(vae, *pixels.shape[2:]))]
    mean = torch.cat([d.mean for d in dists]).float()
    std = torch.cat([d.std for d in dists]).float()
    return mean.transpose(0, 1).unsqueeze(0), std.transpose(0, 1).unsqueeze(0)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (1, c, f, h, w) -> uint8 frames (f, 8h, 8w, 3), decoded a few frames at a time."""
    frames = (latents[0].transpose(0, 1) / vae.config.scaling_factor).to(vae.dtype)
    height, width = frames.shape[2] * 8, frames.shape[3] * 8
    pixels = torch.cat([vae.decode(chunk).sample for chunk in frames.split(vae_frames(vae, height, width))])
    if not torch.isfinite(pixels).all():  # clamping would turn them into black frames
        raise TavError(
            "the VAE decoded NaN or inf pixels; nothing was written",
            "with fp16 try --precision bf16 or fp32; otherwise the latents are out of range (a lower --guidance?)",
        )
    pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def vae_frames(vae: AutoencoderKL, height: int, width: int) -> int:
    """How many frames the VAE encodes or decodes per call (each frame is independent)."""
    if vae.device.type != "cpu":
        return GPU_VAE_FRAMES
    per_frame = height * width * vae.config.block_out_channels[0] * 4  # its widest full-resolution activation
    return max(1, CPU_VAE_BYTES // per_frame)
