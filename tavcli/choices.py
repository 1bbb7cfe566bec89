"""The closed sets of values options take, as `Literal` types: a leaf that the settings, the runtime and
the method share (so the method needs nothing from the option declarations)."""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "AttentionSource",
    "BlendMaps",
    "FrameNorm",
    "InversionKind",
    "OutputFormat",
    "Precision",
    "ResizeMode",
    "SavePrecision",
    "SelfAttention",
    "WordMap",
    "choices",
]

OutputFormat = Literal["mp4", "gif", "frames"]
ResizeMode = Literal["crop", "stretch"]
FrameNorm = Literal["joint", "frame"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
SavePrecision = Literal["fp32", "fp16", "bf16"]  # what a tune's tensors are stored in
# How edits start: plain DDIM inversion (the reference), or one that reconstructs the source clip.
InversionKind = Literal["ddim", "null-text", "negative-prompt"]
# Attention control: where the source's attention comes from, which self-attention it replaces, how words map.
AttentionSource = Literal["trajectory", "branch"]
SelfAttention = Literal["temporal", "spatial", "both"]
WordMap = Literal["auto", "replace", "refine"]
BlendMaps = Literal["auto", "replaced", "own"]  # which maps of the edit's words local blending reads


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a choice set (`choices(OutputFormat)` -> ("mp4", "gif", "frames"))."""
    return get_args(literal)
