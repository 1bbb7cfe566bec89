"""What a controlled edit puts on its device: the inversion's trajectory stays on the host, and
each step moves the latent it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "10"]
CONTROL = ["--steps", "5", "--cross-replace", "0.4", "--self-replace", "0.6", "--blend-source", "man"]
# A device the host's tensors are not on, though it is the CPU: what is moved there is seen moving.
DEVICE = torch.device("cpu", 0)


@pytest.mark.slow
def test_a_controlled_edit_moves_the_trajectory_one_step_at_a_time(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    code, _, err = run_tav("edit", "a cat is skiing", "-p", project, *CONTROL, "--device", str(DEVICE))
    assert code == 0, err  # the inversion made and stored
    moved: list[torch.Size] = []
    to = torch.Tensor.to

    def spied(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is not None and torch.device(target) == DEVICE:
            moved.append(self.shape)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spied)
    code, _, err = run_tav("edit", "a dog is skiing", "-p", project, *CONTROL, "--device", str(DEVICE))
    monkeypatch.undo()
    assert code == 0, err
    assert not [shape for shape in moved if len(shape) == 6]  # never the whole trajectory (6, 1, 4, 2, 4, 4)
    assert torch.Size([1, 4, 2, 4, 4]) in moved  # its noise (each step's latent: test_attention_control.py)
