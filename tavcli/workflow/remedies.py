"""What to try when a result is not finite or a tune would not fit, in the command line's terms (the method only
reports what happened)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tavcli.errors import TavError
from tavcli.method.memory import TuneWontFit
from tavcli.method.training import TuneDiverged
from tavcli.runtime import bf16_is_native

__all__ = ["naming_remedies", "overflow_causes", "settings_that_fit"]

_LORA = "a LoRA scale may be too large: try a smaller PATH:SCALE"


def overflow_causes(precision: str, loras: object) -> str | None:
    """What may have made a result with these edit-time LoRAs NaN or inf, and what to try: only what would
    help (bf16 and fp32 share a range, so only fp16 overflows where they would not)."""
    causes = [_LORA] if loras else []
    if precision == "fp16":
        causes.append(_fp16_remedy())
    return "; ".join(causes) or None


def _fp16_remedy() -> str:
    """fp16's remedy on this run's device: bf16 (fp32's range at half the memory) only where the GPU computes it
    natively; elsewhere bf16 is emulated and slow (SDPA falls back to its math path), so fp32."""
    return f"fp16 may have overflowed: try --precision {'bf16 or fp32' if bf16_is_native() else 'fp32'}"


@contextmanager
def naming_remedies(fused_loras: object) -> Iterator[None]:
    """A tune that diverges in the block becomes one error naming what to try: the learning rate, fp16, and
    the scales of the model's fused LoRAs when it has some."""
    try:
        yield
    except TuneDiverged as diverged:
        causes = [f"--lr {diverged.run.learning_rate:g} may be too high"]
        causes += [_fp16_remedy()] if diverged.precision == "fp16" else []
        causes += [_LORA] if fused_loras else []
        raise TavError(diverged.message, "; ".join(causes)) from None


# The field of a memory estimate whose flag is not `--FIELD`.
_FLAGS = {"checkpointing": "--gradient-checkpointing"}


@contextmanager
def settings_that_fit() -> Iterator[None]:
    """A tune that would not fit, stopped in the block, becomes one error naming the flags that would fit."""
    try:
        yield
    except TuneWontFit as wont:
        if not wont.fitting:
            raise
        raise TavError(wont.message, "try " + " or ".join(_as_flags(changes) for changes in wont.fitting)) from None


def _as_flags(changes: dict[str, object]) -> str:
    """`{"checkpointing": True}` -> `--gradient-checkpointing`; `{"width": 384, ...}` -> `--width 384 ...`."""
    words = []
    for field, value in changes.items():
        if field == "precision" and value == "bf16" and not bf16_is_native():
            value = "fp16"  # the same two bytes a number, computed natively where bf16 would be emulated
        flag = _FLAGS.get(field, f"--{field}")
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)
