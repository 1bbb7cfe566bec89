"""The options of `tav tune`, `tav invert` and `tav edit`, each declared once: type, valid range, default, help.

Each is an `Option` (`tavcli.settings.option`). The command line parses and checks flags with these
declarations before anything heavy is imported, batch files check their fields with them before any job
runs, sidecars are checked with them when `--from-sidecar` reads one, and the settings dataclasses check
them again for Python callers. Choice sets (formats, resize modes, precisions) are declared here too.

This module imports neither torch nor typer.
"""

from __future__ import annotations

from tavcli.choices import (
    FrameNorm,
    InversionKind,
    OutputFormat,
    ResizeMode,
    SavePrecision,
    choices,
)
from tavcli.settings.attention_options import ATTENTION
from tavcli.settings.option import Option, OptionError

__all__ = ["EDIT", "GIF_MAX_FPS", "GUIDANCE", "INVERT", "MODEL_DEFAULTS", "SELECTION", "TUNE", "check_rate"]

# GIF frame delays are whole hundredths of a second, and players stretch a delay below 2 to 10.
GIF_MAX_FPS = 50.0


# Seeds: torch's generators take 0 to 2**64 - 1 (negative seeds are aliases of positive ones).
SEED_MAX = 2**64 - 1
# SD schedulers have 1000 training timesteps and steps_offset 1: 1000 DDIM steps would step past t=999.
DDIM_MAX_STEPS = 999
MIN_SIDE, MAX_SIDE = 8, 4096  # pixels: one latent pixel; beyond any SD model's training size

TUNE = {
    option.name: option
    for option in (
        Option(
            "--frames", int, 24, "Number of frames to tune on (at most what the clip has; SDXL: 6 by default).", low=1
        ),
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
            field="learning_rate",
        ),
        Option(
            "--weight-decay",
            float,
            1e-2,
            "AdamW's decoupled weight decay (the reference's 1e-2; 0: none).",
            low=0,
            high=1,
            key_omits_default=True,
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
            keyed=False,
        ),
        Option(
            "--gradient-checkpointing",
            bool,
            False,
            "Trade compute for memory (same results; on by default for SDXL).",
            keyed=False,
        ),
        Option(
            "--save-precision",
            str,
            "fp32",
            "Store the tuned tensors in fp16 or bf16: half the size; edits then use the rounded tensors "
            "(another result, its own key). Training is shared with the fp32 tune.",
            allowed=choices(SavePrecision),
            key_omits_default=True,
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
            key_omits_default=True,
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


# A model family's own defaults for the tune options its flags leave unset (`tavcli.models.families.model_family`),
# where the paper's (24 frames at 512x512) do not fit a 24 GB card: SDXL trains 8.3x SD 1.5's tensors on a
# 2.6B-parameter UNet, and the pre-flight fits it 7 frames at 512x512 at most in half precision with gradient
# checkpointing (which computes the same numbers); 6 leave 0.7 GiB to spare (docs/performance.md, "SDXL memory").
MODEL_DEFAULTS: dict[str, dict[str, object]] = {"sdxl": {"frames": 6, "gradient_checkpointing": True}}

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
            guides=True,
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
            guides=True,
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


# The edit options classifier-free guidance is made of (`Option.guides`), in declaration order.
GUIDANCE = tuple(name for name, option in EDIT.items() if option.guides)


def check_rate(fmt: str, fps: float | None) -> None:
    """The one rule between two options: a GIF's --fps is at most GIF_MAX_FPS."""
    if fmt == "gif" and fps is not None and fps > GIF_MAX_FPS:
        raise OptionError(
            f"--fps {fps:g} is too fast for a GIF: GIFs play at most {GIF_MAX_FPS:g} fps",
            "GIF frame delays are whole hundredths of a second and players slow delays below 2; use mp4",
        )
