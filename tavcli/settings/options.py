"""The options of `tav tune`, `tav invert` and `tav edit`, each declared once: type, valid range, default, help.

The command line parses and checks flags with these declarations before anything heavy is
imported, batch files check their fields with them before any job runs, sidecars are checked
with them when `--from-sidecar` reads one, and the settings dataclasses check them again for
Python callers. Choice sets (formats, resize modes, precisions) are declared here too.

This module imports neither torch nor typer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    choices,
)
from tavcli.errors import TavError

__all__ = [
    "EDIT",
    "GIF_MAX_FPS",
    "INVERT",
    "TUNE",
    "Option",
    "OptionError",
    "SELECTION",
    "check_fields",
    "check_rate",
]

# GIF frame delays are whole hundredths of a second, and players stretch a delay below 2 to 10.
GIF_MAX_FPS = 50.0


class OptionError(TavError):
    """A flag, batch field or sidecar value outside its declared type or range: a usage error (status 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Option:
    """One option: its flag, value type, range (inclusive unless `above`), default and help."""

    flag: str
    kind: type  # int, float, str or bool; str with `allowed` is a choice
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False  # `low` itself is not allowed
    allowed: tuple[str, ...] = ()
    why: str = ""  # a hint given with a refused value
    words: tuple[str, ...] = ()  # words a number option also takes (`--frames all`)
    value_name: str = ""  # the metavar in --help, where the type's name says too little (`PROMPT`)
    # Left out of cache keys at its default, so that entries keyed before the option existed stay valid.
    key_omits_default: bool = False
    many: bool = False  # repeatable: the value is a tuple of such values (default `()`)

    @property
    def name(self) -> str:
        """The field name in batch files, sidecars and Python: `--checkpoint-every` -> `checkpoint_every`."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def metavar(self) -> str:
        if self.value_name:
            return self.value_name
        number = {int: "INT", float: "FLOAT", str: "TEXT"}.get(self.kind, "")
        return "|".join((number, *self.words)) if self.words else number

    def describe(self) -> str:
        """What a valid value is, in words: 'an integer from 1 to 999', 'a finite number above 0'."""
        if self.many:
            return f"a list of {'text' if self.kind is str else self.kind.__name__} values"
        if self.allowed:
            return f"one of {', '.join(self.allowed)}"
        if self.kind is str:
            return "text"
        if self.kind is bool:
            return "true or false"
        noun = "an integer" if self.kind is int else "a finite number"
        bounds = self.bounds()
        number = f"{noun} {'of ' if bounds.startswith('at ') else ''}{bounds}".rstrip()
        return " or ".join((number, *self.words))

    def bounds(self) -> str:
        """The numeric range alone: 'from 1 to 999', 'at least 0', 'above 0' ('' when unbounded)."""
        low, high = _figure(self.low), _figure(self.high)
        if self.low is not None and self.high is not None:
            return f"above {low} and at most {high}" if self.above else f"from {low} to {high}"
        if self.low is not None:
            return f"above {low}" if self.above else f"at least {low}"
        return "" if self.high is None else f"at most {high}"

    def check(self, value: Any) -> Any:
        """`value` if it is valid for this option (a tuple of them for `many`); else ValueError('must be ...')."""
        if not self.many:
            return self._check_one(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be {self.describe()}")
        return tuple(map(self._check_one, value))

    def _check_one(self, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be {self.describe()}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.allowed and value not in self.allowed):
                raise ValueError(f"must be {self.describe()}")
            return value
        if value in self.words:
            return value
        number_types = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise ValueError(f"must be {self.describe()}")
        if not math.isfinite(value) or not self._in_range(value):
            raise ValueError(f"must be {self.describe()}")
        return self.kind(value)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def parse(self, given: Any) -> Any:
        """A flag's text (or its default) as a checked value; OptionError names the flag and what it takes."""
        value = given
        if isinstance(given, str) and self.kind in (int, float) and given not in self.words:
            try:
                value = self.kind(given)
            except ValueError:
                value = given
        try:
            return self.check(value)
        except ValueError as error:
            shown = given if isinstance(given, str) and given.strip() else repr(given)
            raise OptionError(f"{self.flag} {error}, not {shown}", self.why or None) from None


def _figure(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


# Seeds: torch's generators take 0 to 2**64 - 1 (negative seeds are aliases of positive ones).
SEED_MAX = 2**64 - 1
# SD schedulers have 1000 training timesteps and steps_offset 1: 1000 DDIM steps would step past t=999.
DDIM_MAX_STEPS = 999
MIN_SIDE, MAX_SIDE = 8, 4096  # pixels: one latent pixel; beyond any SD model's training size

TUNE = {
    option.name: option
    for option in (
        Option("--frames", int, 24, "Number of frames to tune on (at most what the clip has).", low=1),
        Option("--stride", int, 2, "Take every S-th frame.", low=1),
        Option("--start", int, 0, "First frame (0-based).", low=0),
        Option(
            "--width",
            int,
            512,
            "Frame width in pixels (rounded to a multiple of 8).",
            low=MIN_SIDE,
            high=MAX_SIDE,
            why="SD 1.x works best at 512, SD 2.x at 768",
        ),
        Option(
            "--height",
            int,
            512,
            "Frame height in pixels (rounded to a multiple of 8).",
            low=MIN_SIDE,
            high=MAX_SIDE,
            why="SD 1.x works best at 512, SD 2.x at 768",
        ),
        Option(
            "--resize",
            str,
            "crop",
            "crop keeps the aspect ratio (centre crop); stretch is the reference's.",
            allowed=choices(ResizeMode),
        ),
        Option("--steps", int, 500, "Training steps.", low=1, high=1_000_000),
        Option(
            "--lr",
            float,
            3e-5,
            "AdamW learning rate (AdamW moves each weight by about this much per step).",
            low=0,
            high=1,
            above=True,
            why="the reference uses 3e-5",
        ),
        Option("--seed", int, 33, "Seed for initial weights, noise and timesteps.", low=0, high=SEED_MAX),
        Option(
            "--frame-norm",
            str,
            "joint",
            "ResNet GroupNorm statistics over the whole clip (reference) or per frame.",
            allowed=choices(FrameNorm),
        ),
        Option(
            "--checkpoint-every",
            int,
            100,
            "Save a resumable state every N steps (0: only on Ctrl-C and at the end).",
            low=0,
        ),
        Option(
            "--save-precision",
            str,
            "fp32",
            "Store the tuned tensors in fp16 or bf16: half the size; edits then use the rounded tensors "
            "(another result, its own key). Training is shared with the fp32 tune.",
            allowed=choices(SavePrecision),
        ),
        Option(
            "--rank",
            int,
            0,
            "Tune rank-R LoRA adapters (peft) on the same layers instead of the whole projections: a tune of a "
            "few MB (another method, its own key). 0: the whole projections, as the paper.",
            low=0,
            high=1024,
            why="4 to 64 are usual ranks",
        ),
        Option(
            "--preview",
            str,
            "",
            "Keep the tuned state every --preview-every steps and render this prompt from each, with a grid over "
            "steps: pick a step count by looking.",
        ),
        Option("--preview-every", int, 100, "Steps between kept states (with --preview).", low=1),
        Option(
            "--preview-steps",
            int,
            10,
            "DDIM steps of each preview's inversion and edit (a preview, not the final edit).",
            low=1,
            high=DDIM_MAX_STEPS,
        ),
    )
}


def _ddim_steps(help: str) -> Option:
    return Option("--steps", int, 50, help, low=1, high=DDIM_MAX_STEPS, why="50 is the usual choice")


# Which frames `tav invert` and `tav edit` work on: any number, not only the tuned ones (long clips).
SELECTION = {
    option.name: option
    for option in (
        Option(
            "--frames",
            int,
            None,
            "Frames to invert and edit [default: the tuned ones]; all: the clip's whole length from --start.",
            low=1,
            words=("all",),
        ),
        Option("--stride", int, None, "Take every S-th frame [default: the tuned stride].", low=1),
        Option("--start", int, None, "First frame, 0-based [default: the tuned start].", low=0),
        Option(
            "--window",
            int,
            None,
            "Frames per UNet call: longer selections run in overlapping windows that all keep the clip's frame 0, "
            "blended (bounds memory by the window) [default: all frames at once].",
            low=2,
            why="the tuned frame count (24 by default) is a good window",
        ),
    )
}

INVERT = {
    option.name: option
    for option in (
        _ddim_steps("DDIM inversion steps."),
        Option(
            "--prompt", str, "", "The inversion's prompt [default: empty, as in the reference].", value_name="PROMPT"
        ),
        Option(
            "--inversion",
            str,
            "ddim",
            "ddim: the reference's (the empty prompt); null-text: invert with the tune's prompt, then fit one "
            "unconditional embedding per step at the edit's guidance so that the tune's prompt gives the clip back "
            "(Mokady et al.; cached); negative-prompt: the tune's prompt as the unconditional branch (Miyake et "
            "al.; no fitting).",
            allowed=choices(InversionKind),
        ),
        Option(
            "--null-iterations",
            int,
            10,
            "Null-text: Adam iterations per step at most (the paper's 10).",
            low=1,
            high=1000,
        ),
        Option(
            "--null-lr",
            float,
            1e-2,
            "Null-text: Adam's learning rate at the first step, decaying to about half by the last (the paper's).",
            low=0,
            high=10,
            above=True,
            why="the paper uses 1e-2",
        ),
    )
}

# Attention control (`tav edit`; docs/method.md, "Attention control"): all off at their defaults.
ATTENTION = (
    Option(
        "--cross-replace",
        float,
        0.0,
        "The edit's cross-attention maps are the source's for this fraction of the steps (Prompt-to-Prompt; "
        "Video-P2P uses 0.2, FateZero's style edits 0.8); 0: off.",
        low=0,
        high=1,
        value_name="FRACTION",
        key_omits_default=True,
    ),
    Option(
        "--self-replace",
        float,
        0.0,
        "The edit's self-attention maps are the source's for this fraction of the steps (0.5 in Video-P2P and "
        "FateZero): keeps the source's structure and motion; 0: off.",
        low=0,
        high=1,
        value_name="FRACTION",
        key_omits_default=True,
    ),
    Option(
        "--self-attention",
        str,
        "temporal",
        "The self-attention --self-replace takes: temporal (attn_temp, Video-P2P's), spatial (sparse-causal attn1 "
        "in layers of at most a quarter of the latent's size, FateZero's), or both.",
        allowed=choices(SelfAttention),
        key_omits_default=True,
    ),
    Option(
        "--word-map",
        str,
        "auto",
        "How the edit prompt's tokens take the source's cross-attention: replace (a word swap: equal token "
        "counts), refine (the shared words aligned, new words keep their own); auto: replace for equal counts.",
        allowed=choices(WordMap),
        key_omits_default=True,
    ),
    Option(
        "--reweight",
        str,
        (),
        "Scale an edit-prompt word's cross-attention while --cross-replace replaces it (Video-P2P uses 2 to 5); "
        "repeatable.",
        value_name="WORD=SCALE",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-source",
        str,
        (),
        "Local blend: the edit keeps the source outside the region this word of the source prompt attends to "
        "(with --attention-from trajectory it also fuses self-attention by it, FateZero's); repeatable.",
        value_name="WORD",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-edit",
        str,
        (),
        "Local blend: the edited region also takes in where this word of each edit prompt attends; repeatable.",
        value_name="WORD",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-maps",
        str,
        "auto",
        "The --blend-edit words' maps while --cross-replace replaces them: replaced (the maps the edit is given, "
        "Video-P2P's), own (the edit's own, FateZero's); auto: replaced with --attention-from branch, own with "
        "trajectory.",
        allowed=choices(BlendMaps),
        key_omits_default=True,
    ),
    Option(
        "--attention-from",
        str,
        "trajectory",
        "The source's attention: trajectory (recomputed from the cached inversion at each step: FateZero's maps, "
        "nothing stored) or branch (the source sampled beside the edit, Video-P2P's; needs --inversion null-text "
        "or negative-prompt).",
        allowed=choices(AttentionSource),
        key_omits_default=True,
    ),
)

EDIT = {
    option.name: option
    for option in (
        _ddim_steps("DDIM sampling steps."),
        Option(
            "--guidance",
            float,
            12.5,
            "Classifier-free guidance scale (0: the negative prompt alone; 1: the prompt without guidance).",
            low=0,
            high=100,
            why="12.5 is the reference's; above ~30 colours saturate; to steer away from something, use --negative",
        ),
        Option("--negative", str, "", "Negative prompt (replaces the empty prompt).", value_name="PROMPT"),
        Option("--seed", int, 33, "Seed for DDIM noise (used when --eta > 0).", low=0, high=SEED_MAX),
        Option("--eta", float, 0.0, "DDIM eta: 0 is deterministic, 1 is DDPM-like.", low=0, high=1),
        Option(
            "--guidance-rescale",
            float,
            0.0,
            "Rescale the guided prediction towards the prompt's spread (Lin et al. 2023, diffusers' "
            "guidance_rescale): fixes over-exposure at high guidance; 0: off.",
            low=0,
            high=1,
            why="0.7 is the paper's",
            key_omits_default=True,
        ),
        Option("--format", str, "mp4", "mp4 (H.264), gif, or a folder of PNG frames.", allowed=choices(OutputFormat)),
        Option(
            "--fps",
            float,
            None,
            f"Frame rate [default: source fps / stride; GIFs at most {GIF_MAX_FPS:g}].",
            low=0.01,
            high=1000,
            why="clips usually play at 8 to 60 fps; H.264 players drop frames above 1000",
        ),
        Option("--batch-size", int, 1, "Prompts sampled together in one UNet batch (GPU throughput).", low=1),
        Option("--control-scale", float, 1.0, "Strength of the ControlNet residuals (0: none).", low=0, high=10),
        *SELECTION.values(),
        Option(
            "--tune-step",
            int,
            None,
            "Edit with the state kept at step N of the tune (tav tune --preview-every) [default: the finished tune].",
            low=1,
            high=1_000_000,
        ),
        *ATTENTION,
    )
}


def check_rate(fmt: str, fps: float | None) -> None:
    """The one rule between two options: a GIF's --fps is at most GIF_MAX_FPS."""
    if fmt == "gif" and fps is not None and fps > GIF_MAX_FPS:
        raise OptionError(
            f"--fps {fps:g} is too fast for a GIF: GIFs play at most {GIF_MAX_FPS:g} fps",
            "GIF frame delays are whole hundredths of a second and players slow delays below 2; use mp4",
        )


def check_fields(options: dict[str, Option], values: dict[str, Any], where: str) -> None:
    """Check named values (a dataclass's fields, a sidecar's record) against their declarations."""
    for name, value in values.items():
        option = options.get(name)
        if option is None or (value is None and option.default is None):
            continue
        try:
            option.check(value)
        except ValueError as error:
            raise OptionError(f"{where}: {name} {error}, not {value!r}", option.why or None) from None
