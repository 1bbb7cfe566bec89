"""Time the video UNet's three workloads: a training step, an inversion step, a guided sampling step.

Prints the median of several runs and the peak memory (CUDA allocator, or process RSS on CPU).
Random weights only: no download. Examples:

    python benchmarks/bench_unet.py                                   # tiny model, CPU
    python benchmarks/bench_unet.py --unet sd --frames 8 --size 256   # SD-1.x-shaped UNet
    python benchmarks/bench_unet.py --unet sd --frames 24 --size 512 --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from importlib import resources

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from tavcli.inversion import ddim_inversion
from tavcli.model import inflate_unet, trainable_parameters
from tavcli.runtime import resolve_runtime
from tavcli.sampling import ddim_sample

# Stable Diffusion 1.x UNet (CompVis/stable-diffusion-v1-4 unet/config.json), weights random.
SD_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "sample_size": 64,
}


def _unet(kind: str) -> UNet2DConditionModel:
    if kind == "sd":
        return UNet2DConditionModel(**SD_UNET)
    config = json.loads((resources.files("tavcli") / "tiny" / "unet.json").read_text())
    return UNet2DConditionModel(**config)


def _median_seconds(step, repeats: int, sync) -> float:  # type: ignore[no-untyped-def]
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["tiny", "sd"], default="tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="frame size in pixels (latents are size/8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    runtime = resolve_runtime(args.device, args.precision)
    device = runtime.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    unet = inflate_unet(_unet(args.unet)).to(device)
    params = trainable_parameters(unet)
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params.values(), lr=3e-5)
    latent = args.size // 8
    sample = torch.randn(1, 4, args.frames, latent, latent, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)

    def train_step() -> None:
        unet.train()
        with runtime.autocast():
            loss = unet(sample, torch.tensor([500], device=device), text).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inversion_step() -> None:  # one DDIM inversion step, through the real function
        unet.eval()
        with runtime.autocast():
            ddim_inversion(unet, scheduler, sample, text, 1)

    def sampling_step() -> None:  # one guided DDIM step: the UNet on [uncond, cond]
        unet.eval()
        with runtime.autocast():
            ddim_sample(unet, scheduler, sample, text, text, 1, 12.5)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    results = {
        name: _median_seconds(fn, args.repeats, sync)
        for name, fn in [
            ("train step", train_step),
            ("inversion step", inversion_step),
            ("sampling step (cfg)", sampling_step),
        ]
    }
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    print(
        f"unet={args.unet} frames={args.frames} size={args.size} device={device} precision={runtime.precision} "
        f"checkpointing={args.gradient_checkpointing} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    for name, seconds in results.items():
        print(f"  {name:<22} {seconds * 1000:9.1f} ms   ({1 / seconds:.2f} it/s)")
    print(f"  peak memory            {peak:9.2f} GiB ({'CUDA allocated' if cuda else 'process RSS'})")
    trainable = sum(p.numel() for p in params.values())
    total = sum(p.numel() for p in unet.parameters())
    print(f"  trainable parameters   {trainable / 1e6:9.2f} M of {total / 1e6:.1f} M")


if __name__ == "__main__":
    main()
