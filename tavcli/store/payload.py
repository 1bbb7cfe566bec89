"""Safetensors payloads of the store (entries' tensors, training checkpoints): reading and checking them.

Anything wrong with a payload, from a truncated file to a NaN, is reported as a `ValueError` with a
short reason, so that the store tools list damage instead of failing on it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from tavcli.files.reading import parse_json

__all__ = ["load_payload", "nonfinite", "payload_problems", "read_header", "structure_problem"]


def load_payload(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors (on the CPU) and metadata of a safetensors payload; ValueError if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"not a readable safetensors file ({error})") from None
    return tensors, _header(data[: _header_end(data)]).get("__metadata__", {})


def nonfinite(tensors: dict[str, Any]) -> list[str]:
    """The names of floating-point tensors holding NaN or inf."""
    import torch

    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def read_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file (names, shapes, offsets, `__metadata__`), checked against the
    file's size without reading the tensors; ValueError saying why if the file is not whole."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise ValueError(f"truncated ({size} bytes)")
            length = struct.unpack("<Q", head)[0]
            if length > size - 8:
                raise ValueError(f"truncated ({size} bytes; its header alone needs {length + 8})")
            header = _header(head + file.read(length))
    except ValueError as error:
        raise ValueError(f"{path.name}: {error}") from None
    except OSError as error:
        raise ValueError(f"{path.name} cannot be read: {error.strerror}") from None
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise ValueError(f"{path.name}: truncated ({size} of {needed} bytes)")
    return header


def structure_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, from its header and size alone; None if it looks whole."""
    try:
        read_header(path)
    except ValueError as error:
        return str(error)
    return None


def payload_problems(data: bytes, name: str) -> list[str]:
    """What is wrong with a payload's content: unreadable, or NaN/inf values (empty when sound)."""
    try:
        tensors, _ = load_payload(data)
    except ValueError as error:
        return [f"{name} is {error}"]
    bad = nonfinite(tensors)
    return [f"{name} holds NaN or inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"] if bad else []


def _header_end(data: bytes) -> int:
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + int(length)


def _header(data: bytes) -> dict[str, Any]:
    try:
        header = parse_json(data[8 : _header_end(data)])
        if not isinstance(header, dict) or not all(
            name == "__metadata__" or isinstance(info, dict) and len(info.get("data_offsets", ())) == 2
            for name, info in header.items()
        ):
            raise ValueError
    except (ValueError, TypeError, struct.error, UnicodeDecodeError):
        raise ValueError("its safetensors header is damaged") from None
    return header
