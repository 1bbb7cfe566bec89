"""What `tav tune` asks for (`TuneRequest`): the frames and their size, the training settings, the previews; each
checked against its declaration (`tavcli.settings.options.TUNE`) when made. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tavcli.choices import FrameNorm, ResizeMode, SavePrecision
from tavcli.progress import Reporter
from tavcli.settings.declared import FLAGS, Declared, Names, check_settings, keyed_fields, plain_zeros
from tavcli.settings.inputs import require_folder, require_prompt
from tavcli.settings.option import Option, OptionError, check_fields
from tavcli.settings.options import TUNE

__all__ = [
    "FrameSelection",
    "FrameSize",
    "Preview",
    "TuneRequest",
    "TuneSettings",
    "preview_choice",
    "snap_to_multiple",
]

SIZE_MULTIPLE = 8  # the VAE halves the size three times and the UNet needs whole latents


@dataclass(frozen=True, kw_only=True)
class FrameSelection(Declared):
    """Which frames to take: `frames` of them, every `stride`-th, from frame `start` (0-based)."""

    OPTIONS: ClassVar[Mapping[str, Option]] = TUNE
    frames: int = TUNE["frames"].default
    stride: int = TUNE["stride"].default
    start: int = TUNE["start"].default

    def __post_init__(self) -> None:
        check_settings(TUNE, self, "frame selection")

    @property
    def last_index(self) -> int:
        return self.start + (self.frames - 1) * self.stride

    def __contains__(self, index: int) -> bool:
        """Whether frame `index` (0-based) is selected (arithmetic: --frames may be absurdly large)."""
        return self.start <= index <= self.last_index and (index - self.start) % self.stride == 0


@dataclass(frozen=True, kw_only=True)
class FrameSize(Declared):
    """Frame size in pixels and how to fit the source into it (`snapped` rounds it to multiples of 8)."""

    OPTIONS: ClassVar[Mapping[str, Option]] = TUNE
    width: int = TUNE["width"].default
    height: int = TUNE["height"].default
    resize: ResizeMode = TUNE["resize"].default

    def __post_init__(self) -> None:
        check_settings(TUNE, self, "frame size")

    def snapped(self, reporter: Reporter) -> FrameSize:
        """This size rounded to multiples of 8, with a note when it changed."""
        width, height = snap_to_multiple(self.width), snap_to_multiple(self.height)
        if (width, height) != (self.width, self.height):
            reporter.note(f"size {self.width}x{self.height} rounded to {width}x{height} (multiples of 8)")
        return FrameSize(width=width, height=height, resize=self.resize)


def snap_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Round `value` to the nearest positive multiple of `multiple` (halves round up)."""
    return max(multiple, (value + multiple // 2) // multiple * multiple)


@dataclass(frozen=True, kw_only=True)
class TuneSettings(Declared):
    """How a tune trains and stores (the reference's defaults: 500 AdamW steps at lr 3e-5, seed 33).

    Each field is set by the `tav tune` option that names it (`tavcli.settings.options.TUNE`, `Option.attribute`),
    which gives its default and range: the command line's flags, batch files' fields, the tune's cache key
    (`keyed`) and the sidecars' reproduce commands are made from these fields by name, so a new field with
    its declaration is a new option everywhere.
    """

    OPTIONS: ClassVar[Mapping[str, Option]] = TUNE
    steps: int = TUNE["steps"].default
    learning_rate: float = TUNE["lr"].default
    weight_decay: float = TUNE["weight_decay"].default
    seed: int = TUNE["seed"].default
    gradient_checkpointing: bool = TUNE["gradient_checkpointing"].default  # same numbers: in no key
    checkpoint_every: int = TUNE["checkpoint_every"].default  # 0: only when stopped or done
    save_precision: SavePrecision = TUNE["save_precision"].default  # the stored tensors': the edits' numbers
    rank: int = TUNE["rank"].default  # > 0: rank-`rank` LoRA adapters instead of the projections
    frame_norm: FrameNorm = TUNE["frame_norm"].default  # ResNet GroupNorm over the clip or per frame

    def __post_init__(self) -> None:
        plain_zeros(self)
        check_settings(TUNE, self, "tune settings")

    def keyed(self) -> dict[str, Any]:
        """The fields that determine the tuned tensors, by field name, as the tune's key records them."""
        return keyed_fields(TUNE, self)


@dataclass(frozen=True, kw_only=True)
class Preview:
    """`tav tune --preview`: keep the state every `every` steps, render `prompt` from each with `steps` DDIM steps."""

    prompt: str
    every: int = TUNE["preview_every"].default
    steps: int = TUNE["preview_steps"].default

    def __post_init__(self) -> None:
        require_prompt(self.prompt)
        check_fields(TUNE, {"preview_every": self.every, "preview_steps": self.steps}, "preview")


def preview_choice(
    prompt: str | None,
    every: int | None = None,
    steps: int | None = None,
    evaluate: bool = False,
    names: Names = FLAGS,
) -> Preview | None:
    """The previews a tune asks for, or None; each None was not given. The options that only concern
    previews are refused without a preview prompt (they would change nothing), and so is an empty one."""
    if prompt is None:
        if evaluate:
            raise OptionError(f"{names('eval')} scores the previews: give {names.wanted('preview', 'PROMPT')} too")
        alone = [name for name, value in (("preview_every", every), ("preview_steps", steps)) if value is not None]
        if alone:
            raise OptionError(f"{names(alone[0])} applies to previews: give {names.wanted('preview', 'PROMPT')} too")
        return None
    if not prompt.strip():
        raise OptionError(f"{names('preview')} is empty: it is the prompt the previews render", "give it some text")
    every = TUNE["preview_every"].default if every is None else every
    return Preview(prompt=prompt, every=every, steps=TUNE["preview_steps"].default if steps is None else steps)


@dataclass(frozen=True, kw_only=True)
class TuneRequest:
    """What to tune: a clip and its description, in which project, on which model, and how."""

    clip: Path
    prompt: str
    project: Path
    model: str  # a model name as `tavcli.models.names.model_name` builds it
    selection: FrameSelection = field(default_factory=FrameSelection)
    size: FrameSize = field(default_factory=FrameSize)
    settings: TuneSettings = field(default_factory=TuneSettings)

    def __post_init__(self) -> None:
        require_prompt(self.prompt)
        require_folder(self.project, "--project")
