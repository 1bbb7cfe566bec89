"""The JSON record beside every output: `NAME.mp4.json` (or `NAME.json` beside a frames folder).

An edit's sidecar says what produced the output and which commands reproduce it; a grid's says
which edits it shows and which files it wrote. This module owns the format: where a sidecar is,
writing it, reading it, and what a record refers to. It imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.atomic import write_json
from tavcli.files.hashing import lora_sha256
from tavcli.files.reading import read_json
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.editing import EditRequest, FrameChoice
from tavcli.settings.inputs import require_regular_file
from tavcli.settings.option import OptionError, check_fields
from tavcli.settings.options import EDIT, INVERT
from tavcli.settings.sampling import ControlSpec, EditSettings, InversionSettings

__all__ = [
    "RecordedEdit",
    "edit_keys",
    "output_files",
    "output_of",
    "read_sidecar",
    "recorded_edit",
    "sidecar_of",
    "write_sidecar",
]

SUFFIX = ".json"


def sidecar_of(output: Path) -> Path:
    """The sidecar of an output: `X.mp4` -> `X.mp4.json`, a frames folder `X` -> `X.json`."""
    return output.with_name(output.name + SUFFIX)


def output_of(sidecar: Path) -> Path:
    """The output a sidecar describes (the inverse of `sidecar_of`)."""
    return sidecar.with_name(sidecar.name[: -len(SUFFIX)])


def write_sidecar(output: Path, record: dict[str, Any]) -> Path:
    """Write `record` beside `output`, atomically."""
    path = sidecar_of(output)
    write_json(path, record)
    return path


def read_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's record; one line naming the file if it is not a tav sidecar."""
    require_regular_file(path, "sidecar", "give the .json written beside an output")
    try:
        record = read_json(path)
    except (OSError, ValueError) as error:
        raise TavError(f"{path} is not a tav sidecar: {error}", "give the .json written beside an output") from None
    if not isinstance(record, dict) or not ({"edit", "grid"} & set(record)):
        raise TavError(f"{path} is not a tav sidecar: it records no edit", "give the .json written beside an output")
    return record


def edit_keys(record: dict[str, Any]) -> list[str]:
    """The keys of the edits an output shows: its own edit, or every edit of a grid."""
    if isinstance(record.get("grid"), dict):
        return [str(key) for key in record["grid"].get("edits", [])]
    return [str(record["edit"]["key"])]


def output_files(sidecar: Path, record: dict[str, Any]) -> list[Path]:
    """Every file or folder an output consists of (a grid's GIF and sheet too), its sidecar last.

    A grid's files are plain names beside the sidecar; anything else (`../x`, a path) is refused, so
    that removing an output never reaches outside its folder.
    """
    extra = record.get("grid", {}).get("files", []) if isinstance(record.get("grid"), dict) else []
    if not isinstance(extra, list) or not all(isinstance(name, str) and Path(name).name == name for name in extra):
        raise TypeError(f"{sidecar} names files that are not beside it")
    return [output_of(sidecar), *(sidecar.parent / name for name in extra), sidecar]


@dataclass(frozen=True)
class RecordedEdit:
    """An edit as its sidecar records it: the request that renders it again (its batch included)."""

    sidecar: Path
    record: dict[str, Any]
    prompt: str
    request: EditRequest

    @property
    def key(self) -> str:
        return str(self.record["edit"]["key"])

    @property
    def precision(self) -> str:
        return str(self.record["edit"].get("precision", "fp32"))

    @property
    def compiled(self) -> bool:
        return bool(self.record["edit"].get("compile"))

    def require_same_loras(self) -> None:
        """Refuse, naming them, the edit-time LoRAs whose content changed since the sidecar was written
        (the key would differ, and not because of the precision or --compile)."""
        recorded = self.record["edit"].get("loras") or []
        changed = [
            path
            for (path, _), then in zip(self.request.loras, recorded, strict=False)
            if not isinstance(then, dict) or lora_sha256(path) != then.get("sha256")
        ]
        if changed:
            raise TavError(
                f"{' and '.join(f'the LoRA {path}' for path in changed)} changed since {self.sidecar} was written",
                "edit again with --lora to render with it as it is now",
            )


def recorded_edit(sidecar: Path, out: Path | None = None) -> RecordedEdit:
    """The edit a sidecar describes, every setting checked as the command line checks it: a sidecar
    edited by hand (or damaged) is refused with the field and its range, never rendered with a NaN."""
    record = read_sidecar(sidecar)
    if "edit" not in record:
        raise TavError(f"{sidecar} describes a grid, not an edit", "give the sidecar of one edit")
    try:
        edit, output, inversion = record["edit"], record["output"], record["inversion"]
        prompt, group = edit["prompt"], record.get("batch", [edit["prompt"]])
        if not isinstance(prompt, str) or not isinstance(group, list) or not all(isinstance(p, str) for p in group):
            raise ValueError("its prompt or batch is not text")
        # Every setting the edit's key records; a setting it leaves out was at its default.
        values = {s.name: edit[s.name] for s in fields(EditSettings) if edit.get(s.name) is not None}
        fps = None if output["fps"] is None else _rate(output["fps"])
        check_fields(EDIT, {**values, "format": output["format"], "fps": fps}, str(sidecar))
        check_fields(INVERT, {"steps": inversion["steps"], "prompt": inversion["prompt"]}, str(sidecar))
        if not isinstance(group, list) or prompt not in group:
            raise ValueError("its batch does not hold its prompt")
        used = record.get("control")
        if used and not edit.get("control"):
            raise ValueError("it records a control its edit does not use")
        if edit.get("control") and not used:
            raise TavError(
                f"{sidecar} records a controlled edit but not its condition clip (an older tav wrote it)",
                "run `tav edit` again with the same --control options",
            )
        control = None
        if used:
            video = None if used["video"] is None else Path(used["video"])
            control = ControlSpec(kind=used["kind"], model=used["model"], video=video, scale=used["scale"])
        chosen = record.get("frames") or {}
        frames = FrameChoice.named(chosen)
        loras = tuple((Path(lora["path"]), _lora_scale(lora["scale"], sidecar)) for lora in record.get("loras", []))
        request = EditRequest(
            project=Path(record["project"]),
            prompts=group,
            settings=EditSettings.named(values),
            out=out if out is not None else sidecar.parent,
            format=output["format"],
            fps=fps,
            batch_size=len(group),
            control=control,
            tune_key=str(record["tune"]["key"]),
            invert_steps=inversion["steps"],
            invert_prompt=inversion["prompt"],
            frames=frames,
            loras=loras,
            inversion=InversionSettings.named(record.get("inversion_settings") or {}),
            attention=AttentionSettings.named(edit.get("attention") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as error:
        raise TavError(f"{sidecar} is not a tav sidecar: {error}", "give the .json written beside an output") from None
    return RecordedEdit(sidecar, record, prompt, request)


def _rate(recorded: Any) -> float:
    """A recorded frame rate ("30000/1001" or a number) as a float. One beyond a float's range (1e400, which
    JSON reads as inf) becomes inf for the range check to refuse by name: a Fraction cannot hold it."""
    try:
        return float(Fraction(recorded))
    except OverflowError:
        return math.inf


def _lora_scale(recorded: Any, sidecar: Path) -> float:
    """A recorded LoRA scale, refused in one line unless finite, as `--lora PATH:SCALE` is: an infinite one
    would only show as NaN weights once the model is loaded."""
    try:
        scale = float(recorded)
    except OverflowError:  # an integer of hundreds of digits
        scale = math.inf
    if not math.isfinite(scale):
        raise OptionError(f"{sidecar}: a LoRA's scale must be a finite number, not {scale}", "e.g. 0.8")
    return scale
