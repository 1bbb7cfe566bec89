"""No needless host syncs in the step loops: after the first step, a step reads nothing back from the
device and copies nothing from the host.

On a GPU each of these stalls the host until the queued work is done, or copies a few bytes while
the GPU waits. The CPU cannot show the stalls, so a run on it counts what would cause them:

- `read`: an ATen `_local_scalar_dense` (`.item()`, `bool()`, `int()` of a tensor, indexing by a
  0-dim tensor), a device-to-host sync;
- `made`: an ATen `lift_fresh` (`torch.tensor(...)`, indexing by a Python list), a tensor made from
  host data and so copied to the device;
- `moved`: `Tensor.to(device)`, `.cpu()`, `.tolist()` calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from tavcli.method.inversion import ddim_inversion
from tavcli.method.sampling import Guidance, ddim_sample
from tavcli.method.windows import WindowedUNet, Windows

FRAMES, WINDOWS, STEPS = 7, Windows(4, 1), 4  # three windows: [0,1,2,3] [0,3,4,5] [0,4,5,6]
NONE = {"read": 0, "made": 0, "moved": 0}


class _HostTraffic(TorchDispatchMode):
    """Counts the ATen ops that read a device value on the host or make a tensor from host data."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["read"] += 1
        elif func is torch.ops.aten.lift_fresh.default:
            self.counts["made"] += 1
        return func(*args, **(kwargs or {}))


def _names_a_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


@contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    to, cpu, tolist = torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.tolist

    def counted_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counts["moved"] += _names_a_device(args, kwargs)
        return to(self, *args, **kwargs)

    def counted_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        counts["moved"] += 1
        return cpu(self, *args, **kwargs)

    def counted_tolist(self: torch.Tensor) -> Any:
        counts["moved"] += 1
        return tolist(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "to", counted_to)
        patch.setattr(torch.Tensor, "cpu", counted_cpu)
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        with _HostTraffic(counts):
            yield counts


def _per_step(counts: Counter[str], marks: list[Counter[str]]) -> Callable[..., None]:
    """An `on_step` callback keeping a snapshot of the counts after each step."""
    return lambda *_: marks.append(counts.copy())


def _deltas(marks: list[Counter[str]]) -> list[dict[str, int]]:
    """What each step after the first added."""
    return [{key: after[key] - before[key] for key in NONE} for before, after in pairwise(marks)]


def _unet(sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, **extra: Any) -> SimpleNamespace:
    """A stand-in video UNet: device arithmetic only, using the timestep and any residuals it gets."""
    out = 0.3 * sample + torch.sin(sample * (1 + timestep / 1000))
    for residual in extra.get("down_block_additional_residuals", []):
        out = out + residual.mean() * 1e-3
    return SimpleNamespace(sample=out)


def _control(
    sample: torch.Tensor, timestep: torch.Tensor | float | int, text: torch.Tensor, frames: torch.Tensor | None = None
) -> dict[str, Any]:
    """Per-frame residuals shaped like a ControlNet's (clips * frames first): sliced by the windows, or a window's."""
    residual = sample.transpose(1, 2).flatten(0, 1)
    return {"down_block_additional_residuals": [residual, residual[:, :1]], "mid_block_additional_residual": residual}


def _latents(clips: int = 1) -> torch.Tensor:
    return torch.randn(clips, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))


def test_windowed_calls_copy_nothing_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    windowed = WindowedUNet(_unet, WINDOWS)
    sample, text = _latents(2), torch.zeros(2, 77, 8)
    timesteps = torch.tensor([901, 601, 301, 1]).unbind()
    marks: list[Counter[str]] = []
    with _counting(monkeypatch) as counts:
        for timestep in timesteps:
            windowed(sample, timestep, text, **_control(sample, timestep, text))
            marks.append(counts.copy())
    assert _deltas(marks) == [NONE] * (STEPS - 1)


def test_v_prediction_inversion_steps_sync_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    marks: list[Counter[str]] = []
    with _counting(monkeypatch) as counts:
        ddim_inversion(
            WindowedUNet(_unet, WINDOWS), scheduler, _latents(), torch.zeros(1, 77, 8), STEPS, _per_step(counts, marks)
        )
    assert len(marks) == STEPS and _deltas(marks) == [NONE] * (STEPS - 1)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampling_steps_sync_nothing(monkeypatch: pytest.MonkeyPatch, eta: float) -> None:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear")
    marks: list[Counter[str]] = []
    with _counting(monkeypatch) as counts:
        ddim_sample(
            WindowedUNet(_unet, WINDOWS),
            scheduler,
            _latents(),
            torch.ones(1, 77, 8),
            torch.zeros(1, 77, 8),
            STEPS,
            guidance=Guidance(7.5),
            eta=eta,
            generator=torch.Generator().manual_seed(1),
            on_step=_per_step(counts, marks),
            control=_control,
        )
    # eta > 0: the step's noise is drawn on the CPU generator and moved (item 5, inside diffusers' step).
    expected = {**NONE, "moved": 1 if eta else 0}
    assert len(marks) == STEPS and _deltas(marks) == [expected] * (STEPS - 1)
