"""What `tav invert` and `tav edit` ask for (`EditRequest`): prompts, how to sample (`tavcli.settings.sampling`),
attention control (`tavcli.settings.attention`), the frames (`FrameChoice`) and the outputs; each part checked
against its declaration when made, and against the others. Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tavcli.choices import OutputFormat
from tavcli.errors import TavError
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.declared import FLAGS, Declared, Names, check_settings
from tavcli.settings.inputs import require_folder, require_prompt, require_regular_file
from tavcli.settings.option import Option, OptionError, check_fields
from tavcli.settings.options import EDIT, INVERT, SELECTION, check_rate
from tavcli.settings.sampling import ControlSpec, EditSettings, InversionSettings
from tavcli.settings.tuning import FrameSelection

__all__ = ["EditRequest", "FrameChoice"]


@dataclass(frozen=True, kw_only=True)
class FrameChoice(Declared):
    """The frames `tav invert`/`tav edit` work on: each field None takes the tuned selection's; `frames`
    may be "all" (the clip's whole length from `start`). `window` frames per UNet call (None: all at once)."""

    OPTIONS: ClassVar[Mapping[str, Option]] = SELECTION
    frames: int | str | None = None
    stride: int | None = None
    start: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        check_settings(SELECTION, self, "frame choice")

    @property
    def tuned(self) -> bool:
        """Whether this is the tuned selection, processed at once: what `tav edit` did before it had a choice."""
        return self == FrameChoice()

    def selection(self, tuned: FrameSelection, length: Callable[[], int], names: Names = FLAGS) -> FrameSelection:
        """The frames chosen of the tuned clip: each field None takes the `tuned` selection's. `length()` (the
        clip's frame count) is asked only for `frames = "all"`: every frame from `start` on."""
        stride = self.stride or tuned.stride
        start = tuned.start if self.start is None else self.start
        if self.frames != "all":
            return FrameSelection(frames=int(self.frames or tuned.frames), stride=stride, start=start)
        count = length()
        if start >= count:
            raise OptionError(f"{names.given('start', start)} is past the clip's last frame ({count} frames)")
        return FrameSelection(frames=1 + (count - 1 - start) // stride, stride=stride, start=start)


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """What to render: new prompts for a project's tune, how to sample them, and how to write them."""

    project: Path
    prompts: list[str]
    settings: EditSettings = field(default_factory=EditSettings)
    out: Path | None = None  # default: PROJECT/renders
    format: OutputFormat = EDIT["format"].default
    fps: float | None = EDIT["fps"].default  # None: the rate of the tuned frames (source fps / stride)
    batch_size: int = EDIT["batch_size"].default
    control: ControlSpec | None = None
    tune_key: str | None = None  # default: the project's current tune and inversion (else this tune's)
    invert_steps: int | None = None  # with `tune_key`; default: the sampling steps
    invert_prompt: str = INVERT["prompt"].default
    frames: FrameChoice = field(default_factory=FrameChoice)
    tune_step: int | None = EDIT["tune_step"].default  # edit with the state kept at this step of the tune
    loras: tuple[tuple[Path, float], ...] = ()  # applied on top of the tuned model for this edit only
    inversion: InversionSettings = field(default_factory=InversionSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise TavError("give at least one edit prompt", 'e.g. tav edit "a panda is skiing"')
        for prompt in self.prompts:
            require_prompt(prompt)
        check_fields(EDIT, {"format": self.format, "fps": self.fps, "batch_size": self.batch_size}, "edit")
        check_rate(self.format, self.fps)
        if self.invert_steps is not None:
            check_fields(INVERT, {"steps": self.invert_steps, "prompt": self.invert_prompt}, "inversion")
        if self.out is not None:
            require_folder(self.out, "--out")
        check_fields(EDIT, {"tune_step": self.tune_step}, "edit")
        if self.tune_step is not None and self.tune_key is not None:
            raise OptionError("--tune-step picks a state of the project's current tune: no other tune with it")
        for path, _ in self.loras:
            if not path.is_dir():
                require_regular_file(path, "LoRA file", "--lora takes a .safetensors file (or folder) of LoRA weights")
        self.inversion.check(self.settings, self.control, FLAGS, self.invert_steps, bool(self.loras))
        self.attention.check(self.settings, self.inversion, self.prompts, FLAGS, self.invert_steps)

    @property
    def groups(self) -> list[list[str]]:
        """The prompts (each once, in order) as they share UNet batches: `batch_size` at a time; alone
        with eta > 0, so that a prompt's noise does not depend on the others."""
        unique = list(dict.fromkeys(self.prompts))
        size = self.batch_size if self.settings.eta == 0 else 1
        return [unique[i : i + size] for i in range(0, len(unique), size)]
