"""The project directory: a content-addressed cache of everything `tav` computes for one clip.

Layout (plain folders a person can read; see docs/store.md):

    CLIP.tav/
      project.json                  which tune and inversion `tav edit` uses now
      latents/<key>/                the clip's VAE latent distribution (mean, std)
      tunes/<key>/                  the tuned tensors (delta.safetensors)
      inversions/<key>/             the DDIM inversion trajectory
      edits/<key>/                  the edited clip's final latents
      <each>/meta.json              what determined it (`spec`) and facts about it

`key` is a hash of the entry's spec (every input that determines it) and `METHOD_VERSION`. An entry
is complete once its `meta.json` exists: payloads are written first, each atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from tavcli.atomic import atomic_path, write_json
from tavcli.errors import TavError

__all__ = ["METHOD_VERSION", "Entry", "Project", "cache_key"]

# Bump when a change to the method changes what an entry holds: old entries then stop matching.
METHOD_VERSION = 1
TENSORS = "tensors.safetensors"


def cache_key(spec: dict[str, Any]) -> str:
    """A short, stable hash of `spec` (JSON-serialisable) and the method version."""
    canonical = json.dumps({"method": METHOD_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One cached artifact: a folder holding payload files and, once complete, `meta.json`."""

    kind: str
    key: str
    path: Path
    spec: dict[str, Any]

    @property
    def complete(self) -> bool:
        return (self.path / "meta.json").is_file()

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as error:
            raise TavError(f"damaged cache entry {self.path}: {error}", "remove the folder to recompute it") from None

    def save(self, tensors: dict[str, Any], facts: dict[str, Any]) -> None:
        """Write the tensors, then the metadata that marks the entry complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path / TENSORS) as temp:
            save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(temp))
        write_json(self.path / "meta.json", {"kind": self.kind, "key": self.key, "spec": self.spec, **facts})

    def tensors(self, device: Any = "cpu") -> dict[str, Any]:
        try:
            return load_file(str(self.path / TENSORS), device=str(device))
        except (OSError, ValueError) as error:
            raise TavError(f"damaged cache entry {self.path}: {error}", "remove the folder to recompute it") from None


class Project:
    """A project directory: keyed entries plus `project.json`, the pointers `tav edit` follows."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, kind: str, spec: dict[str, Any]) -> Entry:
        key = cache_key({"kind": kind, **spec})
        return Entry(kind=kind, key=key, path=self.root / kind / key, spec=spec)

    def find(self, kind: str, key: str) -> Entry:
        path = self.root / kind / key
        entry = Entry(kind=kind, key=key, path=path, spec={})
        if not entry.complete:
            raise TavError(f"project {self.root} has no complete {kind[:-1]} {key}", "run `tav tune` again")
        return Entry(kind=kind, key=key, path=path, spec=entry.meta()["spec"])

    @property
    def state(self) -> dict[str, Any]:
        path = self.root / "project.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TavError(f"damaged {path}: {error}") from None

    def update_state(self, **changes: Any) -> None:
        write_json(self.root / "project.json", {**self.state, **changes})
