"""What a command asks for, as checked values: a tune (`TuneRequest`) and an edit (`EditRequest`).

Each checks itself against the option declarations (`tavcli.settings.options`) when it is made, so the
command line, batch files, sidecars and Python callers get the same one-line errors. This module
imports no torch: the command line builds its requests before loading anything heavy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tavcli.choices import (
    AttentionSource,
    BlendMaps,
    FrameNorm,
    InversionKind,
    OutputFormat,
    ResizeMode,
    SavePrecision,
    SelfAttention,
    WordMap,
)
from tavcli.errors import TavError
from tavcli.progress import Reporter
from tavcli.settings.inputs import require_folder, require_prompt, require_regular_file
from tavcli.settings.options import EDIT, INVERT, SELECTION, TUNE, OptionError, check_fields, check_rate
from tavcli.words import prompt_words

__all__ = [
    "AttentionSettings",
    "CONTROL_KINDS",
    "ControlSpec",
    "EditRequest",
    "EditSettings",
    "FrameChoice",
    "FrameSelection",
    "FrameSize",
    "FLAGS",
    "InversionSettings",
    "Names",
    "Preview",
    "TuneRequest",
    "TuneSettings",
    "control_spec",
    "frame_size",
    "preview_choice",
    "snap_to_multiple",
]

CONTROL_KINDS = ("canny", "depth", "pose", "seg", "scribble", "normal", "lineart", "softedge")


SIZE_MULTIPLE = 8  # the VAE halves the size three times and the UNet needs whole latents


@dataclass(frozen=True)
class Names:
    """How a rule's message names the options it concerns: as the command line's flags (`--start`), or as
    a batch file's fields (`'edit.start'`), so that one rule serves both."""

    table: str | None = None  # None: flags; "" a batch job's top level; "edit" or "invert" one of its tables

    def __call__(self, name: str) -> str:
        """`--preview-every`, or `field 'preview_every'`."""
        if self.table is None:
            return "--" + name.replace("_", "-")
        return f"field '{self.table + '.' if self.table else ''}{name}'"

    def given(self, name: str, value: object) -> str:
        """An option with its value: `--start 48`, or `field 'edit.start' = 48`."""
        return f"{self(name)} {value}" if self.table is None else f"{self(name)} = {value}"

    def wanted(self, name: str, metavar: str) -> str:
        """An option to add: `--preview PROMPT`, or `field 'preview'`."""
        return f"{self(name)} {metavar}" if self.table is None else self(name)


FLAGS = Names()


@dataclass(frozen=True, kw_only=True)
class FrameSelection:
    """Which frames to take: `frames` of them, every `stride`-th, from frame `start` (0-based)."""

    frames: int = 24
    stride: int = 2
    start: int = 0

    def __post_init__(self) -> None:
        check_fields(TUNE, asdict(self), "frame selection")

    @property
    def last_index(self) -> int:
        return self.start + (self.frames - 1) * self.stride

    def __contains__(self, index: int) -> bool:
        """Whether frame `index` (0-based) is selected (arithmetic: --frames may be absurdly large)."""
        return self.start <= index <= self.last_index and (index - self.start) % self.stride == 0


@dataclass(frozen=True, kw_only=True)
class FrameSize:
    """Output frame size in pixels (multiples of 8) and how to fit the source into it."""

    width: int = 512
    height: int = 512
    resize: ResizeMode = "crop"


def snap_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Round `value` to the nearest positive multiple of `multiple` (halves round up)."""
    return max(multiple, (value + multiple // 2) // multiple * multiple)


@dataclass(frozen=True, kw_only=True)
class TuneSettings:
    """The reference's defaults: 500 AdamW steps at lr 3e-5, seed 33."""

    steps: int = 500
    learning_rate: float = 3e-5
    seed: int = 33
    gradient_checkpointing: bool = False  # saves memory, same numbers: not part of the cache key
    checkpoint_every: int = 100  # save a resumable state every N steps (0: only when stopped or done)
    save_precision: SavePrecision = "fp32"  # the stored tensors' precision: changes the edits' numbers
    rank: int = 0  # > 0: tune rank-`rank` LoRA adapters instead of the whole projections (another method)

    def __post_init__(self) -> None:
        _plain_zeros(self)
        values = {"steps": self.steps, "lr": self.learning_rate, "seed": self.seed, "rank": self.rank}
        stored = {"checkpoint_every": self.checkpoint_every, "save_precision": self.save_precision}
        check_fields(TUNE, {**values, **stored}, "tune settings")


@dataclass(frozen=True, kw_only=True)
class Preview:
    """`tav tune --preview`: keep the state every `every` steps, render `prompt` from each with `steps` DDIM steps."""

    prompt: str
    every: int = 100
    steps: int = 10

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


def frame_size(width: int, height: int, resize: ResizeMode, reporter: Reporter) -> FrameSize:
    """The frame size rounded to multiples of 8, with a note when it changed."""
    check_fields(TUNE, {"width": width, "height": height, "resize": resize}, "frame size")
    snapped = snap_to_multiple(width), snap_to_multiple(height)
    if snapped != (width, height):
        reporter.note(f"size {width}x{height} rounded to {snapped[0]}x{snapped[1]} (multiples of 8)")
    return FrameSize(width=snapped[0], height=snapped[1], resize=resize)


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
    frame_norm: FrameNorm = "joint"

    def __post_init__(self) -> None:
        require_prompt(self.prompt)
        check_fields(TUNE, {"frame_norm": self.frame_norm}, "tune")
        require_folder(self.project, "--project")


def _plain_zeros(settings: Any) -> None:
    """Make a float field's -0.0 (`--guidance -0`) 0.0: the same setting, so it must not key apart."""
    for setting in fields(settings):
        value = getattr(settings, setting.name)
        if isinstance(value, float) and value == 0:
            object.__setattr__(settings, setting.name, 0.0)


def _named(settings: type[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `settings`' fields among `values`, by name (each one missing takes its default)."""
    return {setting.name: values[setting.name] for setting in fields(settings) if setting.name in values}


@dataclass(frozen=True, kw_only=True)
class EditSettings:
    """DDIM sampling settings of an edit (the reference's: 50 steps, guidance 12.5, eta 0).

    Each field is the `tav edit` option of its name (`tavcli.settings.options.EDIT`), which gives its
    default and range: the command line's flags, batch files' `edit` fields, cache keys, sidecars and
    their reproduce commands are all made from these fields by name, so a new field is a new option.
    """

    steps: int = EDIT["steps"].default
    guidance: float = EDIT["guidance"].default
    negative: str = EDIT["negative"].default
    seed: int = EDIT["seed"].default  # only draws noise when eta > 0
    eta: float = EDIT["eta"].default
    guidance_rescale: float = EDIT["guidance_rescale"].default

    def __post_init__(self) -> None:
        _plain_zeros(self)
        check_fields(EDIT, asdict(self), "edit settings")

    @classmethod
    def named(cls, values: Mapping[str, Any]) -> EditSettings:
        """The settings among `values` (a batch job's `edit` table, a sidecar's record), by name."""
        return cls(**_named(cls, values))


@dataclass(frozen=True, kw_only=True)
class InversionSettings:
    """How edits start (each field the `tav invert`/`tav edit` option of its name in `INVERT`): plain DDIM
    inversion, null-text inversion with its Adam budget, or negative-prompt inversion."""

    inversion: InversionKind = INVERT["inversion"].default
    null_iterations: int = INVERT["null_iterations"].default
    null_lr: float = INVERT["null_lr"].default

    def __post_init__(self) -> None:
        _plain_zeros(self)
        check_fields(INVERT, asdict(self), "inversion settings")

    @classmethod
    def named(cls, values: Mapping[str, Any]) -> InversionSettings:
        """The settings among `values` (a batch job's `invert` table, a sidecar's record), by name."""
        return cls(**_named(cls, values))

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
class AttentionSettings:
    """Attention control of an edit (docs/method.md, "Attention control"), each field the `tav edit` option of
    its name in `EDIT`; off at the defaults (then no field is in an edit's key)."""

    cross_replace: float = EDIT["cross_replace"].default
    self_replace: float = EDIT["self_replace"].default
    self_attention: SelfAttention = EDIT["self_attention"].default
    word_map: WordMap = EDIT["word_map"].default
    reweight: tuple[str, ...] = EDIT["reweight"].default  # WORD=SCALE
    blend_source: tuple[str, ...] = EDIT["blend_source"].default
    blend_edit: tuple[str, ...] = EDIT["blend_edit"].default
    blend_maps: BlendMaps = EDIT["blend_maps"].default
    attention_from: AttentionSource = EDIT["attention_from"].default

    def __post_init__(self) -> None:
        _plain_zeros(self)
        # A list from typer or a batch file; blend words are a set (their maps are summed), in one order.
        object.__setattr__(self, "reweight", tuple(self.reweight or ()))
        for name in ("blend_source", "blend_edit"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name) or ()))))
        check_fields(EDIT, asdict(self), "attention control")

    @classmethod
    def named(cls, values: Mapping[str, Any]) -> AttentionSettings:
        """The settings among `values` (a batch job's `edit` table, a sidecar's record), by name."""
        return cls(**_named(cls, values))

    @property
    def active(self) -> bool:
        """Whether the edit is controlled at all."""
        return self.cross_replace > 0 or self.self_replace > 0 or bool(self.blend_source or self.blend_edit)

    def changed(self) -> dict[str, Any]:
        """The fields away from their defaults, by name (what keys, sidecars and reproduce commands record)."""
        return {name: value for name, value in asdict(self).items() if value != EDIT[name].default}

    def weights(self, names: Names = FLAGS) -> dict[str, float]:
        """`--reweight WORD=SCALE` as {word: scale}."""
        weights: dict[str, float] = {}
        for given in self.reweight:
            word, _, scale = given.rpartition("=")
            try:
                value = float(scale)
            except ValueError:
                value = math.nan
            if not word.strip() or not 0 <= value <= REWEIGHT_MAX:
                raise OptionError(
                    f"{names('reweight')} takes WORD=SCALE with a scale from 0 to {REWEIGHT_MAX:g}, not {given!r}",
                    "e.g. --reweight sunset=3",
                )
            # Words match whatever their case and punctuation ("PANDA," is "panda"): one scale per word.
            again = [earlier for earlier in weights if set(prompt_words(earlier)) & set(prompt_words(word))]
            if again:
                raise OptionError(
                    f"{names('reweight')} scales {word.strip()!r} twice (also as {again[0]!r})",
                    "give each word one scale",
                )
            weights[word.strip()] = value
        return weights

    def controlled_steps(self, name: str, steps: int) -> int:
        """The steps of `steps` that `cross_replace` or `self_replace` (`name`) controls, counted as Video-P2P's and
        FateZero's code counts them: cross-attention int(c (N + 1)) (their table of N + 1 rows), at most N;
        self-attention int(s N); both in floating point (0.29 of 100 self-attention steps is 28)."""
        if name == "cross_replace":
            return min(int(self.cross_replace * (steps + 1)), steps)
        return int(self.self_replace * steps)

    def check(
        self,
        settings: EditSettings,
        inversion: InversionSettings,
        prompts: list[str],
        names: Names,
        invert_steps: int | None = None,
        inversion_names: Names | None = None,
    ) -> None:
        """Refuse, in one line, what would change nothing or cannot be done: a control option without the
        control it belongs to, a branch without an inversion that re-creates the clip (or with DDIM noise),
        trajectory maps from an inversion of other steps, and an edit-prompt word a prompt lacks.
        `inversion_names` names the inversion's fields (a batch job's `invert` table)."""
        inversion_names = inversion_names or names
        changed = self.changed()
        needs = {
            "reweight": ("cross_replace",),
            "word_map": ("cross_replace",),
            "self_attention": ("self_replace",),
            "blend_maps": ("blend_edit", "cross_replace"),
        }
        for name, needed in needs.items():
            for other in needed:
                if name in changed and other not in changed:
                    raise OptionError(f"{names(name)} applies to {names(other)}: give it too")
        if "attention_from" in changed and not self.active:
            raise OptionError(
                f"{names('attention_from')} applies to attention control: give {names('cross_replace')}, "
                f"{names('self_replace')} or {names('blend_source')} too"
            )
        if not self.active:
            return
        for name, rows in (("cross_replace", settings.steps + 1), ("self_replace", settings.steps)):
            fraction = getattr(self, name)
            if fraction > 0 and self.controlled_steps(name, settings.steps) == 0:
                raise OptionError(
                    f"{names.given(name, fraction)} of {settings.steps} steps controls none of them",
                    f"give at least {math.ceil(1000 / rows) / 1000:g}, or more {names('steps')}",
                )
        given = names.given("attention_from", self.attention_from)
        if self.attention_from == "branch":
            if not inversion.reconstructs:
                raise OptionError(
                    f"{given} samples the source beside the edit, which needs an inversion that gives it back",
                    f"give {inversion_names.given('inversion', 'null-text')} or negative-prompt",
                )
            if settings.eta > 0:
                raise OptionError(f"{given} retraces deterministic DDIM: {names('eta')} must be 0")
        elif invert_steps not in (None, settings.steps):
            raise OptionError(
                f"{given} replays the inversion's calls step for step: its steps ({invert_steps}) must be the "
                f"edit's ({settings.steps})"
            )
        for prompt in prompts:
            _require_words(prompt, "blend_edit", self.blend_edit, names)
            _require_words(prompt, "reweight", tuple(self.weights(names)), names)

    def check_source(self, source: str, names: Names = FLAGS) -> None:
        """Refuse a source blend word that the source prompt lacks, in one line naming its words."""
        _require_words(source, "blend_source", self.blend_source, names, "the source prompt ")


def _require_words(prompt: str, name: str, given: tuple[str, ...], names: Names, whose: str = "") -> None:
    """Refuse, naming the prompt's words, a word of `given` (option `name`'s) that `prompt` lacks."""
    words = prompt_words(prompt)
    for word in given:
        if not prompt_words(word) or any(part not in words for part in prompt_words(word)):
            raise OptionError(
                f"{names.given(name, word)}: {word!r} is not a word of {whose}{prompt!r}",
                f"its words are: {', '.join(dict.fromkeys(words))}",
            )


REWEIGHT_MAX = 10.0


@dataclass(frozen=True, kw_only=True)
class ControlSpec:
    """What the user asked for: a kind of condition, a ControlNet, condition frames and a strength."""

    kind: str
    model: str
    video: Path | None = None  # None: compute the maps from the source clip (canny only)
    scale: float = 1.0

    def __post_init__(self) -> None:
        _plain_zeros(self)
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


@dataclass(frozen=True, kw_only=True)
class FrameChoice:
    """The frames `tav invert`/`tav edit` work on: each field None takes the tuned selection's; `frames`
    may be "all" (the clip's whole length from `start`). `window` frames per UNet call (None: all at once)."""

    frames: int | str | None = None
    stride: int | None = None
    start: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        check_fields(SELECTION, asdict(self), "frame choice")

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
    format: OutputFormat = "mp4"
    fps: float | None = None  # default: the rate of the tuned frames (source fps / stride)
    batch_size: int = 1
    control: ControlSpec | None = None
    tune_key: str | None = None  # default: the project's current tune and inversion (else this tune's)
    invert_steps: int | None = None  # with `tune_key`; default: the sampling steps
    invert_prompt: str = ""
    frames: FrameChoice = field(default_factory=FrameChoice)
    tune_step: int | None = None  # edit with the state kept at this step of the tune
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
