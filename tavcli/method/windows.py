"""Windowed video UNet calls: edit clips longer than fit in memory, MultiDiffusion-style.

The clip's frames are split into overlapping windows of `size` frames; every window also holds the
clip's frame 0, so sparse-causal attention keys always include frame 0 and the whole clip keeps one
appearance. Each UNet call runs on one window; the predictions are then blended per frame: frame 0
comes from the first window, the other frames are weighted averages over the windows that contain
them, with weights ramping linearly across the frames two neighbouring windows share.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

__all__ = ["UNetExtra", "Windows", "WindowedUNet", "call_spans", "controlled_call", "windowed"]


class UNetExtra(Protocol):
    """`control(x, t, text, frames)`: extra UNet arguments (ControlNet residuals) for one call on `x`, which holds
    the clip's frames `frames` (a window's; None: all of them)."""

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        text: torch.Tensor,
        frames: torch.Tensor | None = None,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Windows:
    """How to split a clip: `size` frames per UNet call (frame 0 included), `overlap` frames shared besides frame 0."""

    size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"window size must be at least 2 frames (frame 0 plus one more), not {self.size}")
        if not 0 <= self.overlap <= self.size - 2:
            raise ValueError(
                f"window overlap must be between 0 and size - 2 = {self.size - 2} frames, not {self.overlap}"
            )

    def spans(self, frames: int) -> list[list[int]]:
        """Frame indices each UNet call processes; every frame is covered.

        frames <= size: one call on all frames. Else the first window is frames 0..size-1; each later
        window is [0] + a run of size-1 consecutive frames starting size-1-overlap after the previous
        run's start; the last run is shifted back to end at frames-1 (overlapping its predecessor more).
        """
        if frames <= self.size:
            return [list(range(frames))]
        run, step = self.size - 1, self.size - 1 - self.overlap
        starts = [1]
        while starts[-1] + run < frames:
            starts.append(min(starts[-1] + step, frames - run))
        return [[0, *range(start, start + run)] for start in starts]


def _blend_weights(spans: list[list[int]], frames: int) -> torch.Tensor:
    """(windows, frames) float32 weights w, each frame's column summing to 1 (zero where a window lacks it).

    For frame f at position j of window k's run of L frames (the span without frame 0), sharing h frames
    with window k-1 and t with window k+1:

        u[k, f] = min(1, (j + 1) / (h + 1), (L - j) / (t + 1)),   w[k, f] = u[k, f] / sum_k' u[k', f]

    and frame 0 comes from window 0 alone. The blended prediction of frame f is sum_k w[k, f] * out_k[f].
    """
    runs = [span[1:] for span in spans]
    shared = [len(set(a) & set(b)) for a, b in pairwise(runs)]
    weights = torch.zeros(len(spans), frames)
    for k, run in enumerate(runs):
        head = shared[k - 1] if k > 0 else 0
        tail = shared[k] if k < len(shared) else 0
        for j, frame in enumerate(run):
            # Linear ramps over the shared frames (never zero), 1 elsewhere: neighbours cross-fade.
            weights[k, frame] = min(1.0, (j + 1) / (head + 1), (len(run) - j) / (tail + 1))
    weights[0, 0] = 1.0  # frame 0 from the first window only: later windows only use it as attention context
    return weights / weights.sum(dim=0, keepdim=True)


def _slice_frames(value: Any, clips: int, frames: int, index: torch.Tensor) -> Any:
    """Per-frame kwargs (first dim clips*frames, clip-major) restricted to `index`'s frames; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == clips * frames:
        return value.unflatten(0, (clips, frames))[:, index].flatten(0, 1)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_slice_frames(v, clips, frames, index) for v in value)
    return value


@dataclass(frozen=True)
class _Plan:
    """One clip length's windows on one device, made once: a step then copies nothing from the host."""

    indices: list[torch.Tensor]
    """Each span as an index tensor on the device (a Python list index is copied there at every use)."""
    weights: list[torch.Tensor]
    """Each window's blend weights of its own frames, (len(span), 1, 1) float32 on the device."""

    @classmethod
    def make(cls, windows: Windows, frames: int, device: torch.device) -> _Plan:
        spans = windows.spans(frames)
        weights = _blend_weights(spans, frames)
        return cls(
            [torch.tensor(span, device=device) for span in spans],
            [weights[k, span].view(-1, 1, 1).to(device) for k, span in enumerate(spans)],
        )


class WindowedUNet:
    """Callable like a `VideoUNet` ((b, c, F, h, w) sample, timestep, text) that runs it over frame windows."""

    def __init__(self, unet: Any, windows: Windows) -> None:
        self.unet = unet
        self.windows = windows
        self._plans: dict[tuple[int, torch.device], _Plan] = {}  # every step of a run asks for the same one

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        control: UNetExtra | None = None,
        **kwargs: Any,
    ) -> UNet2DConditionOutput:
        """`control` gives each window its own extra arguments, computed on its frames alone (its memory then
        scales with the window); per-frame `kwargs` are sliced."""
        clips, _, frames = sample.shape[:3]
        if frames <= self.windows.size:
            extra = {} if control is None else control(sample, timestep, encoder_hidden_states)
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs, **extra)
        key = (frames, sample.device)
        if key not in self._plans:
            self._plans[key] = _Plan.make(self.windows, frames, sample.device)
        plan = self._plans[key]
        total: torch.Tensor | None = None
        for index, weights in zip(plan.indices, plan.weights, strict=True):
            part = sample[:, :, index]
            extra = {name: _slice_frames(value, clips, frames, index) for name, value in kwargs.items()}
            if control is not None:
                extra.update(control(part, timestep, encoder_hidden_states, index))
            out = self.unet(part, timestep, encoder_hidden_states, **extra).sample
            if total is None:  # shaped like the UNet's output (its channels may differ from the sample's)
                total = out.new_zeros((*out.shape[:2], frames, *out.shape[3:]), dtype=torch.float32)
            total[:, :, index] += out.float() * weights
        assert total is not None  # there is always at least one span
        return UNet2DConditionOutput(sample=total.to(out.dtype))  # blended in float32, returned in the UNet's dtype


def controlled_call(
    unet: Any, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, control: UNetExtra | None
) -> UNet2DConditionOutput:
    """`unet(sample, timestep, text)` with `control`'s extra arguments: over windows, each window's own."""
    if isinstance(unet, WindowedUNet):
        return unet(sample, timestep, text, control=control)
    return unet(sample, timestep, text, **({} if control is None else control(sample, timestep, text)))


def windowed(unet: Any, window: int | None) -> Any:
    """`unet`, or `unet` run over overlapping windows of `window` frames (a quarter of each shared)."""
    return unet if window is None else WindowedUNet(unet, Windows(window, overlap=window // 4))


def call_spans(unet: Any, frames: int) -> list[list[int]]:
    """The frames of each call `unet` (a video UNet, or one over windows) makes of one call on `frames` frames."""
    return unet.windows.spans(frames) if isinstance(unet, WindowedUNet) else [list(range(frames))]
