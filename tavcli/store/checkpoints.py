"""Checkpoint files: one safetensors file per saved step of a tune run, its layout, writing, reading and damage.

A run is a tune's inputs except its step count (`workflow.keys.tune_run`); its states live in
`checkpoints/RUN/step-N.safetensors`, each file naming its run in its metadata. What a state holds (named
tensors and string metadata: step, losses, AdamW and scaler state, RNG state) is the method's
(`method/training.TrainState.as_file` and `from_file`); `workflow/tuning.load_train_state` joins the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path
from tavcli.files.reading import parse_json
from tavcli.store.payload import load_payload, nonfinite, read_header, structure_problem
from tavcli.store.project import cache_key

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoints"]


class Checkpoints:
    """Resumable training states of one tune run (a tune's inputs except its step count).

    One self-describing safetensors file per saved step: a run that ends at 500 steps keeps
    `step-00000500`, so asking for 800 steps later continues from it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = folder.name

    @classmethod
    def of_run(cls, project_root: Path, run: dict[str, Any]) -> Checkpoints:
        """The checkpoints of tune run `run` (a tune's spec without its steps) in a project."""
        return cls(project_root / "checkpoints" / cache_key({"kind": "checkpoints", **run}))

    def run(self) -> dict[str, Any]:
        """The spec of the run the newest state belongs to (read from its header alone); ValueError if unknown."""
        steps = self.steps()
        if not steps:
            raise ValueError("it holds no saved state")
        try:
            return dict(parse_json(read_header(self.path(steps[-1]))["__metadata__"]["run"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{self.path(steps[-1]).name} does not say which run it belongs to ({error})") from None

    def steps(self) -> list[int]:
        found = []
        for path in self.folder.glob("step-*.safetensors"):
            try:
                found.append(int(path.name[5:-12]))
            except ValueError:
                continue
        return sorted(found)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.safetensors"

    def latest_step(self, at_most: int) -> int | None:
        """The most steps of a saved state not beyond `at_most`."""
        usable = [step for step in self.steps() if step <= at_most]
        return usable[-1] if usable else None

    def read(self, step: int) -> tuple[dict[str, Any], dict[str, str]]:
        """A saved state's tensors and metadata; TavError naming the file and the way out if it is damaged."""
        path = self.path(step)
        try:
            tensors, metadata = load_payload(path.read_bytes())
            bad = nonfinite(tensors)
            if bad:
                raise ValueError(f"it holds NaN or inf in {bad[0]}")
        except (OSError, ValueError) as error:
            raise self.damaged(step, str(error)) from None
        return tensors, metadata

    def damaged(self, step: int, problem: str) -> TavError:
        """The error for a checkpoint that cannot be resumed from, with the ways out."""
        return TavError(
            f"damaged checkpoint {self.path(step)}: {problem}",
            f"`tav gc -p {self.folder.parent.parent}` removes it; or pass --force to train from step 0",
        )

    def problems(self, full: bool = False) -> list[str]:
        """What is wrong with the saved states: their structure, and with `full` their values too."""
        found = [problem for step in self.steps() if (problem := structure_problem(self.path(step)))]
        if full and not found:
            for step in self.steps():
                try:
                    self.read(step)
                except TavError as error:
                    found.append(error.message.split(": ", 1)[-1])
        return found

    def save(self, step: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str], run: dict[str, Any]) -> Path:
        """Write one state (named tensors and string metadata) as `step`'s file, naming the run it belongs to."""
        from safetensors.torch import save

        described = {**metadata, "run": json.dumps(run, sort_keys=True)}
        payload = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, described)
        with atomic_path(self.path(step), needed=len(payload)) as temp:
            temp.write_bytes(payload)
        return self.path(step)

    def discard(self, steps: list[int]) -> None:
        for step in steps:
            self.path(step).unlink(missing_ok=True)
