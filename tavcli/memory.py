"""Memory pre-flight: estimate a tune's peak memory before starting it.

Activation memory is measured, not guessed: one forward and backward of the inflated UNet on a
small probe clip (2 frames, 16x16 latents) counts the bytes autograd saves, in total and inside
each block that gradient checkpointing would recompute, and the bytes entering those blocks.
Flash and memory-efficient attention keep all of these linear in frames x latent pixels, so the
probe scales to the real clip:

    no checkpointing: saved
    checkpointing:    saved - saved inside blocks + block inputs + the largest block's saved bytes

plus twice the largest block input for the gradients in flight during backward; to which come
the weights, the trained tensors' gradients and AdamW moments (3x, fp32), and a
10% margin for temporaries. `tav tune --dry-run` prints it; on a GPU a tune that would not fit
stops with the settings that would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from tavcli.errors import TavError
from tavcli.video_unet import VideoUNet, trainable_parameters

__all__ = [
    "CARDS_GIB",
    "CUDA_CONTEXT",
    "ActivationProbe",
    "MemoryEstimate",
    "card_fits",
    "check_fits",
    "probe_activations",
    "tune_estimate",
]

MARGIN = 1.1
CARDS_GIB = (8, 12, 16, 24)  # the card sizes `tav tune --dry-run` says what fits on
CUDA_CONTEXT = 2**29  # what the CUDA context and allocator take of a card before tavcli allocates anything
MAX_FRAMES = 128  # what the card table counts up to


@dataclass(frozen=True)
class ActivationProbe:
    """Saved-for-backward bytes of one training step on a probe clip of `tokens` frame x latent pixels."""

    tokens: int
    saved: int
    inside_blocks: int
    block_inputs: int
    largest_block: int
    largest_input: int

    def activations(self, tokens: int, checkpointing: bool) -> int:
        """Saved activations at the start of backward, plus the gradients in flight (2x a block's input)."""
        scale = tokens / self.tokens
        kept = self.saved
        if checkpointing:
            kept = self.saved - self.inside_blocks + self.block_inputs + self.largest_block
        return int((kept + 2 * self.largest_input) * scale)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a tune, by part, in bytes."""

    weights: int
    training_state: int
    activations: int
    frames: int
    height: int
    width: int
    checkpointing: bool
    precision: str

    @property
    def total(self) -> int:
        return int((self.weights + self.training_state + self.activations) * MARGIN)

    def describe(self) -> str:
        gib = 2**30
        return (
            f"{self.total / gib:.1f} GiB estimated peak for {self.frames} frames at {self.width}x{self.height}, "
            f"{self.precision}{', gradient checkpointing' if self.checkpointing else ''} "
            f"(weights {self.weights / gib:.1f}, gradients and AdamW {self.training_state / gib:.1f}, "
            f"activations {self.activations / gib:.1f}, +10%)"
        )


def probe_activations(unet: VideoUNet) -> ActivationProbe:
    """Run one fp32 training step of `unet` on a small clip and count what autograd keeps for backward.

    Weights saved for backward are not activations (they are counted once, as weights).
    """
    height = width = 16
    frames = 2
    device = unet.device
    weights = {_storage_key(p) for p in unet.parameters()}
    saved: dict[int, int] = {}
    inside: list[int] = []
    inputs: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in weights:
            saved.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    def before(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].numel() * args[0].element_size())
        inside.append(-sum(saved.values()))

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        inside[-1] += sum(saved.values())

    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    handles = [h for m in blocks for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    params = trainable_parameters(unet)
    was_training, grads = unet.training, {n: p.requires_grad for n, p in params.items()}
    unet.train()
    for param in params.values():
        param.requires_grad_(True)
    try:
        sample = torch.zeros(1, unet.config.in_channels, frames, height, width, device=device)
        text = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(sample, torch.tensor([500], device=device), text).sample
        out.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, param in params.items():
            param.grad = None
            param.requires_grad_(grads[name])
        unet.train(was_training)
    return ActivationProbe(
        tokens=frames * height * width,
        saved=sum(saved.values()),
        inside_blocks=sum(inside),
        block_inputs=sum(inputs),
        largest_block=max(inside, default=0),
        largest_input=max(inputs, default=0),
    )


def tune_estimate(
    unet: VideoUNet,
    probe: ActivationProbe,
    frames: int,
    height: int,
    width: int,
    checkpointing: bool,
    precision: str,
) -> MemoryEstimate:
    """A tune's peak: fp32 UNet weights, 3x the trained tensors, activations (VAE and text encoder are off)."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    trained = sum(p.numel() * 4 for p in trainable_parameters(unet).values())
    activations = _activations(probe, frames, height, width, checkpointing, precision)
    return MemoryEstimate(weights, 3 * trained, activations, frames, height, width, checkpointing, precision)


def card_fits(estimate: MemoryEstimate, probe: ActivationProbe) -> dict[str, dict[str, int]]:
    """For each card size in `CARDS_GIB`: the most frames at `estimate`'s size that a tune fits, per precision
    (half = fp16 or bf16) with and without gradient checkpointing (0: not even one frame)."""
    fits: dict[str, dict[str, int]] = {}
    for gib in CARDS_GIB:
        usable = gib * 2**30 - CUDA_CONTEXT
        fits[f"{gib} GB"] = {
            f"{precision}{' + checkpointing' if checkpointing else ''}": _most_frames(
                estimate,
                probe,
                usable,
                checkpointing=checkpointing,
                precision="bf16" if precision == "half" else precision,
            )
            for precision in ("fp32", "half")
            for checkpointing in (False, True)
        }
    return fits


def check_fits(estimate: MemoryEstimate, probe: ActivationProbe, available: int) -> None:
    """Stop before a tune that would run out of memory, naming settings that would fit."""
    if estimate.total <= available:
        return
    options: list[tuple[str, dict[str, object]]] = []
    if not estimate.checkpointing:
        options.append(("--gradient-checkpointing", {"checkpointing": True}))
    if estimate.precision == "fp32":
        options.append(("--precision bf16", {"precision": "bf16"}))
    suggestions = [flag for flag, changes in options if _changed(estimate, probe, **changes).total <= available]
    fewer = _most_frames(estimate, probe, available, limit=estimate.frames - 1)
    if fewer:
        suggestions.append(f"--frames {fewer}")
    for size in (448, 384, 320, 256):
        smaller = size < max(estimate.height, estimate.width)
        if smaller and _changed(estimate, probe, height=size, width=size).total <= available:
            suggestions.append(f"--width {size} --height {size}")
            break
    gib = 2**30
    raise TavError(
        f"this tune needs about {estimate.total / gib:.1f} GiB but {available / gib:.1f} GiB is free: "
        + estimate.describe(),
        ("try " + " or ".join(suggestions)) if suggestions else "use a GPU with more memory",
    )


def _most_frames(
    estimate: MemoryEstimate, probe: ActivationProbe, usable: int, limit: int = MAX_FRAMES, **changes: object
) -> int:
    """The most frames, up to `limit`, whose tune (`estimate` with `changes`) fits in `usable` bytes."""
    frames = 0
    while frames < limit and _changed(estimate, probe, frames=frames + 1, **changes).total <= usable:
        frames += 1
    return frames


def _changed(estimate: MemoryEstimate, probe: ActivationProbe, **changes: object) -> MemoryEstimate:
    """`estimate` for other frames, size, checkpointing or precision: the same weights, activations from the probe."""
    changed = replace(estimate, **changes)  # type: ignore[arg-type]
    activations = _activations(
        probe, changed.frames, changed.height, changed.width, changed.checkpointing, changed.precision
    )
    return replace(changed, activations=activations)


def _activations(
    probe: ActivationProbe, frames: int, height: int, width: int, checkpointing: bool, precision: str
) -> int:
    activations = probe.activations(frames * (height // 8) * (width // 8), checkpointing)
    if precision in ("fp16", "bf16"):
        activations //= 2  # autocast keeps most activations in half precision
    return activations


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() or id(tensor.untyped_storage())
