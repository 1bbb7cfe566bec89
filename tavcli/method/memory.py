"""Memory pre-flight: estimate a tune's peak memory before starting it.

Activation memory is measured, not guessed: a forward and backward of the inflated UNet under the
run's own precision (autocast), on two small probe clips of 3 and 5 frames at 16x16 latents,
counts the bytes autograd saves, in total and inside each block that gradient checkpointing
would recompute, and the bytes entering those blocks. Each count is fitted as a constant plus a
slope per token (frame x latent pixel) and extrapolated to the real clip:

    no checkpointing: saved
    checkpointing:    saved - saved inside blocks + block inputs + the largest block's saved bytes

plus twice the largest block input for the gradients in flight during backward. The constant
matters in half precision: autocast saves a half copy of every frozen fp32 weight each layer
uses, once per step whatever the frames. Both probes have more than 2 frames, so they take the
sparse-causal path where frames from the third on attend to two frames. To the activations come
the weights, the gradients and AdamW moments of the tensors that train (3x, fp32; for a low-rank
tune the adapters alone), and a 10% margin for temporaries. `tav tune --dry-run` prints it; on a
GPU a tune that would not fit stops with the settings that would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from tavcli.errors import TavError
from tavcli.method.training import trained_parameters
from tavcli.method.video_unet import VideoUNet
from tavcli.models.conditioning import pooled_width
from tavcli.runtime import Runtime

__all__ = [
    "CARDS_GIB",
    "CUDA_CONTEXT",
    "PROBE_FRAMES",
    "ActivationProbe",
    "MemoryEstimate",
    "Probes",
    "SavedBytes",
    "TuneWontFit",
    "card_fits",
    "check_fits",
    "probe_activations",
    "probe_tune",
    "tune_estimate",
]

MARGIN = 1.1
CARDS_GIB = (8, 12, 16, 24, 40, 80)  # the card sizes `tav tune --dry-run` says what fits on (SDXL needs the last)
CUDA_CONTEXT = 2**29  # what the CUDA context and allocator take of a card before tavcli allocates anything
MAX_FRAMES = 128  # what the card table counts up to
PROBE_FRAMES = (3, 5)  # two clip lengths past 2, so frames attend to frame 0 and the previous one
PROBE_LATENT = 16  # probe latents are 16x16 (128x128 pixels)


@dataclass(frozen=True)
class SavedBytes:
    """Saved-for-backward bytes of one training step on a probe clip of `tokens` frame x latent pixels:
    in total, inside each block checkpointing would recompute, and entering each (in forward order)."""

    tokens: int
    saved: int
    blocks: tuple[int, ...]
    inputs: tuple[int, ...]

    @property
    def inside_blocks(self) -> int:
        return sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


@dataclass(frozen=True)
class ActivationProbe:
    """Two probes in one precision: each count is their line (a constant plus a slope per token)."""

    precision: str
    small: SavedBytes
    large: SavedBytes

    def activations(self, tokens: int, checkpointing: bool) -> int:
        """Saved activations at the start of backward, plus the gradients in flight (2x a block's input).

        The largest block is chosen at `tokens`, block by block: at the probe's size a block of big
        weights (autocast copies them) can outweigh one of big activations that dominates a real clip.
        """

        def at(small: int, large: int) -> float:
            return small + (large - small) * (tokens - self.small.tokens) / (self.large.tokens - self.small.tokens)

        blocks = [at(s, b) for s, b in zip(self.small.blocks, self.large.blocks, strict=True)]
        inputs = [at(s, b) for s, b in zip(self.small.inputs, self.large.inputs, strict=True)]
        kept = at(self.small.saved, self.large.saved)
        if checkpointing:
            kept = kept - sum(blocks) + sum(inputs) + max(blocks, default=0)
        return max(0, int(kept + 2 * max(inputs, default=0)))

    def constant(self, checkpointing: bool) -> int:
        """The bytes that do not grow with the clip (in half precision: mostly autocast's weight copies)."""
        return self.activations(0, checkpointing)


Probes = Mapping[str, ActivationProbe]  # "fp32" and "half" (fp16 or bf16): what the card table compares


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


def probe_tune(unet: VideoUNet, precision: str) -> dict[str, ActivationProbe]:
    """Probes in fp32 and in half precision (the run's own when it is half, otherwise bf16)."""
    half = precision if precision in ("fp16", "bf16") else "bf16"
    return {"fp32": probe_activations(unet, "fp32"), "half": probe_activations(unet, half)}


def probe_activations(unet: VideoUNet, precision: str = "fp32") -> ActivationProbe:
    """Count what autograd keeps for backward in training steps of `unet` under `precision`'s autocast,
    at each of `PROBE_FRAMES`; the trained tensors require grad as in training, nothing else does.

    Weights saved for backward are not activations (they are counted once, as weights); autocast's
    half copies of them are, since each is a new tensor held until backward.
    """
    params = trained_parameters(unet)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    was_training = unet.training
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    unet.train()
    try:
        small, large = (_saved_bytes(unet, frames, precision) for frames in PROBE_FRAMES)
    finally:
        for name, param in unet.named_parameters():
            param.grad = None
            param.requires_grad_(flags[name])
        unet.train(was_training)
    return ActivationProbe(precision, small, large)


def _saved_bytes(unet: VideoUNet, frames: int, precision: str) -> SavedBytes:
    """One forward and backward of a `frames`-frame probe clip, counting saved tensors by storage."""
    height = width = PROBE_LATENT
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
    try:
        sample = torch.zeros(1, unet.config.in_channels, frames, height, width, device=device)
        rows = 77 if pooled_width(unet.config) is None else 78  # SDXL's pooled embedding rides as one more row
        text = torch.zeros(1, rows, unet.config.cross_attention_dim, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Runtime(device, precision).autocast():
            out = unet(sample, torch.tensor([500], device=device), text).sample
        out.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return SavedBytes(frames * height * width, sum(saved.values()), tuple(inside), tuple(inputs))


def tune_estimate(
    unet: VideoUNet,
    probes: Probes,
    frames: int,
    height: int,
    width: int,
    checkpointing: bool,
    precision: str,
) -> MemoryEstimate:
    """A tune's peak: the UNet's weights, 3x the tensors that train (fp32 gradient and two AdamW moments),
    activations from the probe of `precision` (VAE and text encoder are off the device)."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    trained = sum(p.numel() * 4 for p in trained_parameters(unet).values())
    activations = _activations(probes, frames, height, width, checkpointing, precision)
    return MemoryEstimate(weights, 3 * trained, activations, frames, height, width, checkpointing, precision)


def card_fits(estimate: MemoryEstimate, probes: Probes) -> dict[str, dict[str, int]]:
    """For each card size in `CARDS_GIB`: the most frames at `estimate`'s size that a tune fits, per precision
    (half = fp16 or bf16) with and without gradient checkpointing (0: not even one frame)."""
    fits: dict[str, dict[str, int]] = {}
    for gib in CARDS_GIB:
        usable = gib * 2**30 - CUDA_CONTEXT
        fits[f"{gib} GB"] = {
            f"{precision}{' + checkpointing' if checkpointing else ''}": _most_frames(
                estimate,
                probes,
                usable,
                checkpointing=checkpointing,
                precision=probes[precision].precision,
            )
            for precision in ("fp32", "half")
            for checkpointing in (False, True)
        }
    return fits


class TuneWontFit(TavError):
    """A tune's estimated peak exceeds the memory available. `fitting` lists changes that would fit, as
    fields of the estimate (`{"checkpointing": True}`, `{"precision": "bf16"}`, `{"frames": 12}`,
    `{"width": 384, "height": 384}`), for the caller to word in its own terms."""

    def __init__(self, estimate: MemoryEstimate, available: int, fitting: list[dict[str, object]]) -> None:
        gib = 2**30
        super().__init__(
            f"this tune needs about {estimate.total / gib:.1f} GiB but {available / gib:.1f} GiB is free: "
            + estimate.describe(),
            None if fitting else "use a GPU with more memory",
        )
        self.fitting = fitting


def check_fits(estimate: MemoryEstimate, probes: Probes, available: int) -> None:
    """Stop before a tune that would run out of memory (`TuneWontFit`, with the changes that would fit)."""
    if estimate.total <= available:
        return
    options: list[dict[str, object]] = []
    if not estimate.checkpointing:
        options.append({"checkpointing": True})
    if estimate.precision == "fp32":
        options.append({"precision": "bf16"})
    fitting = [changes for changes in options if _changed(estimate, probes, **changes).total <= available]
    fewer = _most_frames(estimate, probes, available, limit=estimate.frames - 1)
    if fewer:
        fitting.append({"frames": fewer})
    for size in (448, 384, 320, 256):
        smaller = size < max(estimate.height, estimate.width)
        if smaller and _changed(estimate, probes, height=size, width=size).total <= available:
            fitting.append({"width": size, "height": size})
            break
    raise TuneWontFit(estimate, available, fitting)


def _most_frames(
    estimate: MemoryEstimate, probes: Probes, usable: int, limit: int = MAX_FRAMES, **changes: object
) -> int:
    """The most frames, up to `limit`, whose tune (`estimate` with `changes`) fits in `usable` bytes."""
    frames = 0
    while frames < limit and _changed(estimate, probes, frames=frames + 1, **changes).total <= usable:
        frames += 1
    return frames


def _changed(estimate: MemoryEstimate, probes: Probes, **changes: object) -> MemoryEstimate:
    """`estimate` for other frames, size, checkpointing or precision: the same weights, activations from the probe."""
    changed = replace(estimate, **changes)  # type: ignore[arg-type]
    activations = _activations(
        probes, changed.frames, changed.height, changed.width, changed.checkpointing, changed.precision
    )
    return replace(changed, activations=activations)


def _activations(probes: Probes, frames: int, height: int, width: int, checkpointing: bool, precision: str) -> int:
    """Activations of a clip from the probe of its precision family (fp16 and bf16 both store 2 bytes)."""
    probe = probes["fp32" if precision == "fp32" else "half"]
    return probe.activations(frames * (height // 8) * (width // 8), checkpointing)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() or id(tensor.untyped_storage())
