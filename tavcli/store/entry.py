"""One cached artifact of a project: its payload, its `meta.json`, and the checks of both.

An entry `KIND/KEY/` is complete once its `meta.json` exists: the payload is written first,
atomically, and the metadata records its SHA-256 and size. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path, write_json
from tavcli.files.reading import read_json
from tavcli.store.payload import load_payload, nonfinite, payload_problems

__all__ = ["KEY", "KINDS", "LOSS_PLOT", "PARENTS", "TENSORS", "Entry", "noun", "timestamp"]

TENSORS = "tensors.safetensors"
LOSS_PLOT = "loss.png"  # a picture of the loss per step, beside a tune's or a null-text fit's tensors
# The entry kinds, each after the kind it is computed from.
KINDS = ("latents", "embeddings", "tunes", "inversions", "nulltexts", "edits")
# kind -> where its parent is: (the spec field naming the parent's key, the parent's kind), the first field the
# spec has. An edit sampled with null-text embeddings is computed from them (they from the inversion), so
# removing the fit takes the edit; any other edit is computed from its inversion.
PARENTS = {
    "tunes": (("latents", "latents"),),
    "inversions": (("tune", "tunes"),),
    "nulltexts": (("inversion", "inversions"),),
    "edits": (("null_text", "nulltexts"), ("inversion", "inversions")),
}
KEY = re.compile(r"[0-9a-f]{16}")
# One entry of each kind, in words.
NOUNS = {
    "latents": "latents",
    "embeddings": "prompt embeddings",
    "tunes": "tune",
    "inversions": "inversion",
    "nulltexts": "null-text embeddings",
}


def noun(kind: str) -> str:
    """What one entry of `kind` is called in messages ("the tune 3fe8...")."""
    return NOUNS.get(kind, kind.removesuffix("s"))


def timestamp(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _damaged(path: Path, why: object) -> TavError:
    if not path.is_dir():  # not damaged: gone, removed by `tav rm` or `tav gc` while this command ran
        return TavError(f"the {noun(path.parent.name)} {path.name} was removed by another tav command", "run it again")
    hint = f"`tav rm {path.parent.name}/{path.name} -p {path.parent.parent}` removes it; then run again"
    return TavError(f"damaged cache entry {path}: {why}", hint)


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

    @property
    def parent(self) -> tuple[str, str] | None:
        """(kind, key) of the entry this one was computed from."""
        for field_name, kind in PARENTS.get(self.kind, ()):
            if self.spec.get(field_name) is not None:
                return kind, str(self.spec[field_name])
        return None

    def meta(self) -> dict[str, Any]:
        """`meta.json`, checked to hold a spec and to list the payload with its hash and size."""
        try:
            meta = read_json(self.path / "meta.json")
        except ValueError as error:
            raise _damaged(self.path, f"meta.json is not valid JSON ({error})") from None
        except OSError as error:
            raise _damaged(self.path, error) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
            raise _damaged(self.path, "meta.json has no spec")
        listed = meta.get("files")
        recorded = listed.get(TENSORS) if isinstance(listed, dict) else None
        if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
            raise _damaged(self.path, f"meta.json does not list its payload {TENSORS}")
        return meta

    def save(
        self,
        tensors: dict[str, Any],
        facts: Mapping[str, Any],
        extra: dict[str, bytes] | None = None,
        causes: str | None = "with fp16, try --precision fp32",
    ) -> None:
        """Write the tensors (and `extra` files by name, e.g. a picture), then the metadata that lists each
        file with its hash and marks the entry complete.

        Tensors holding NaN or inf are refused: a cached wrong result would be reused forever. `causes`
        is the hint then, from a caller that knows the run (its precision, its LoRAs, its device). The
        default names fp32 alone: the store knows no device, and bf16 helps only on GPUs with bf16 cores.
        """
        from safetensors.torch import save

        bad = nonfinite(tensors)
        if bad:
            raise TavError(
                f"the {self.kind[:-1]} came out as NaN or inf ({', '.join(bad)}); nothing was stored", causes
            )
        payload = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
        first = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            files = {}
            for name, data in {TENSORS: payload, **(extra or {})}.items():
                with atomic_path(self.path / name, needed=len(data)) as temp:
                    temp.write_bytes(data)
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            meta = {"kind": self.kind, "key": self.key, "spec": self.spec, "files": files, "created": timestamp()}
            write_json(self.path / "meta.json", {**meta, **facts})
        except BaseException:
            if first:  # a failed first write (a full disk) leaves no half entry for `tav verify` to trip on
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def tensors(self, device: Any = "cpu") -> dict[str, Any]:
        """The payload, checked against the SHA-256 recorded when it was written and for NaN or inf."""
        recorded = self.meta()["files"][TENSORS]["sha256"]
        try:
            payload = (self.path / TENSORS).read_bytes()
        except OSError as error:
            raise _damaged(self.path, error) from None
        if hashlib.sha256(payload).hexdigest() != recorded:
            raise _damaged(self.path, "its payload does not match the SHA-256 recorded when it was written")
        try:
            tensors, _ = load_payload(payload)
        except ValueError as error:
            raise _damaged(self.path, f"{TENSORS} is {error}") from None
        bad = nonfinite(tensors)
        if bad:
            raise _damaged(self.path, f"{TENSORS} holds NaN or inf in {', '.join(bad[:3])}")
        return {name: t.to(device) for name, t in tensors.items()}

    def quick_problems(self) -> list[str]:
        """What is wrong with this complete entry that its metadata and file sizes show (no hashing)."""
        try:
            files = self.meta()["files"]
        except TavError as error:
            return [error.message.split(": ", 1)[-1]]
        found = []
        for name, recorded in files.items():
            path = self.path / name
            if not path.is_file():
                found.append(f"{name} is missing")
            elif isinstance(recorded, dict) and recorded.get("bytes") not in (None, path.stat().st_size):
                found.append(f"{name} is truncated or padded ({path.stat().st_size} of {recorded['bytes']} bytes)")
        return found

    def problems(self) -> list[str]:
        """Everything wrong with this complete entry: metadata, sizes, payload hashes, NaN or inf values."""
        found = self.quick_problems()
        if found:
            return found
        for name, recorded in self.meta()["files"].items():
            if not isinstance(recorded, dict):
                found.append(f"meta.json's record of {name} is damaged")
                continue
            data = (self.path / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
                found.append(f"{name} does not match its recorded SHA-256")
            elif name.endswith(".safetensors"):
                found += payload_problems(data, name)
        return found
