"""Reading JSON that a user or a damaged store can hand us: entries' `meta.json`, `project.json`, sidecars,
safetensors headers, the hash memo.

Whatever the text, the only failure is a `ValueError` saying why, so each reader reports damage in its
own words: nesting deep enough to exhaust the parser's recursion (`[` * 100000) included. This module
imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MAX_DEPTH", "nesting_depth", "parse_json", "read_json"]

# tav writes nothing nested more than a few levels; a limit well below the interpreter's recursion limit
# makes what is refused the same whatever the caller's stack depth, and keeps later code off deep values.
MAX_DEPTH = 32


def parse_json(text: str | bytes) -> Any:
    """The value of a JSON text; ValueError if it is not JSON (invalid UTF-8 included) or nests too deep."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    if nesting_depth(value) > MAX_DEPTH:
        raise _too_deep()
    return value


def read_json(path: Path) -> Any:
    """The value of a JSON file; OSError if it cannot be read, ValueError as `parse_json`."""
    return parse_json(path.read_bytes())


def _too_deep() -> ValueError:
    return ValueError(f"lists and objects nested more than {MAX_DEPTH} levels deep")


def nesting_depth(value: Any) -> int:
    """How deep lists and objects (dicts) nest in `value` (a string or number: 0), walked without recursion
    (so any depth is safe) and no further than one level past `MAX_DEPTH`."""
    deepest, pending = 0, [(value, 1)]
    while pending and deepest <= MAX_DEPTH:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
