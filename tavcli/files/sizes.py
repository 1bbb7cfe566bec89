"""Byte counts as people read them (`tav ls`, the app's Library): 1.2 MB."""

from __future__ import annotations

__all__ = ["human_size"]


def human_size(count: int) -> str:
    """`count` bytes in B, kB, MB, GB or TB (powers of 1000), one decimal past bytes."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
