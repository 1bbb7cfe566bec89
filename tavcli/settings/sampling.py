"""How an edit samples: its DDIM settings (`EditSettings`), the inversion it starts from (`InversionSettings`,
with the rules of what cannot go with it) and a ControlNet (`ControlSpec`); each checked against its declaration
(`tavcli.settings.options`) when made. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tavcli.choices import InversionKind
from tavcli.settings.declared import Declared, Names, check_settings, plain_zeros
from tavcli.settings.inputs import require_regular_file
from tavcli.settings.option import Option, OptionError, check_fields
from tavcli.settings.options import EDIT, INVERT

__all__ = ["CONTROL_KINDS", "ControlSpec", "EditSettings", "InversionSettings", "control_spec"]

CONTROL_KINDS = ("canny", "depth", "pose", "seg", "scribble", "normal", "lineart", "softedge")


@dataclass(frozen=True, kw_only=True)
class EditSettings(Declared):
    """DDIM sampling settings of an edit (the reference's: 50 steps, guidance 12.5, eta 0).

    Each field is the `tav edit` option of its name (`tavcli.settings.options.EDIT`), which gives its
    default and range: the command line's flags, batch files' `edit` fields, cache keys, sidecars and
    their reproduce commands are all made from these fields by name, so a new field is a new option.
    """

    OPTIONS: ClassVar[Mapping[str, Option]] = EDIT
    steps: int = EDIT["steps"].default
    guidance: float = EDIT["guidance"].default
    negative: str = EDIT["negative"].default
    seed: int = EDIT["seed"].default  # only draws noise when eta > 0
    eta: float = EDIT["eta"].default
    guidance_rescale: float = EDIT["guidance_rescale"].default

    def __post_init__(self) -> None:
        plain_zeros(self)
        check_settings(EDIT, self, "edit settings")


@dataclass(frozen=True, kw_only=True)
class InversionSettings(Declared):
    """How edits start (each field the `tav invert`/`tav edit` option of its name in `INVERT`): plain DDIM
    inversion, null-text inversion with its Adam budget, or negative-prompt inversion."""

    OPTIONS: ClassVar[Mapping[str, Option]] = INVERT
    inversion: InversionKind = INVERT["inversion"].default
    null_iterations: int = INVERT["null_iterations"].default
    null_lr: float = INVERT["null_lr"].default

    def __post_init__(self) -> None:
        plain_zeros(self)
        check_settings(INVERT, self, "inversion settings")

    @property
    def reconstructs(self) -> bool:
        """Whether edits invert with the source prompt and replace the unconditional branch (not plain DDIM)."""
        return self.inversion != "ddim"

    def check(
        self,
        settings: EditSettings,
        control: ControlSpec | None,
        names: Names,
        invert_steps: int | None = None,
        loras: bool = False,
        own: Names | None = None,
    ) -> None:
        """Refuse, in one line, what cannot go with this inversion: Adam's budget without null-text (it would
        change nothing), a negative prompt (the unconditional branch is the inversion's), and for null-text
        DDIM noise (eta > 0), a ControlNet (the fit does not see it) or inversion steps other than the
        sampling steps (one embedding per sampling step) or edit-time LoRAs (the fit does not see them
        either). `own` names the inversion's fields (a batch job's `invert` table), `names` the others."""
        own = own or names
        budget = [name for name in ("null_iterations", "null_lr") if getattr(self, name) != INVERT[name].default]
        if budget and self.inversion != "null-text":
            raise OptionError(f"{own(budget[0])} applies to {own.given('inversion', 'null-text')}: give it too")
        if not self.reconstructs:
            return
        given = own.given("inversion", self.inversion)
        if self.inversion == "null-text" and invert_steps not in (None, settings.steps):
            raise OptionError(
                f"{given} fits one embedding per sampling step: the inversion's steps ({invert_steps}) must be "
                f"the edit's ({settings.steps})"
            )
        if settings.negative:
            raise OptionError(
                f"{names('negative')} cannot go with {given}: the unconditional branch is the inversion's",
                f"use {own.given('inversion', 'ddim')} for a negative prompt",
            )
        if self.inversion == "null-text" and settings.eta > 0:
            raise OptionError(f"{given} retraces deterministic DDIM: {names('eta')} must be 0")
        if self.inversion == "null-text" and loras:
            raise OptionError(
                f"{given} cannot go with {names('lora')}: the embeddings are fitted without edit-time LoRAs",
                f"use {own.given('inversion', 'negative-prompt')} with a LoRA",
            )
        if self.inversion == "null-text" and control is not None:
            raise OptionError(
                f"{given} cannot go with {names('control')}: the embeddings are fitted without the ControlNet",
                f"use {own.given('inversion', 'negative-prompt')} with a ControlNet",
            )


@dataclass(frozen=True, kw_only=True)
class ControlSpec:
    """What the user asked for: a kind of condition, a ControlNet, condition frames and a strength."""

    kind: str
    model: str
    video: Path | None = None  # None: compute the maps from the source clip (canny only)
    scale: float = EDIT["control_scale"].default

    def __post_init__(self) -> None:
        plain_zeros(self)
        if self.kind not in CONTROL_KINDS:
            raise OptionError(f"unknown --control {self.kind!r}", f"use one of {', '.join(CONTROL_KINDS)}")
        if self.video is None and self.kind != "canny":
            raise OptionError(f"--control {self.kind} needs --control-video", "a clip of condition maps, one per frame")
        if self.video is not None:
            require_regular_file(self.video, "video file", "--control-video takes a clip of condition maps")
        check_fields(EDIT, {"control_scale": self.scale}, "control")


def control_spec(kind: str | None, model: str | None, video: Path | None, scale: float) -> ControlSpec | None:
    """The control the options ask for, or None; --control and --control-model go together."""
    if kind is None and model is None and video is None:
        if scale != EDIT["control_scale"].default:
            raise OptionError(
                "--control-scale applies to --control: give it too", "e.g. --control canny --control-model PATH"
            )
        return None
    if kind is None or model is None:
        raise OptionError("--control and --control-model go together", "e.g. --control canny --control-model PATH")
    return ControlSpec(kind=kind, model=model, video=video, scale=scale)
