"""What a sidecar records about an edit: its inputs, environment, and the commands that reproduce it.

The sidecar's format (where it is, reading, writing) is `tavcli.store.sidecar`'s; this module fills it.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from tavcli import __version__
from tavcli.models.names import parse_model_name
from tavcli.settings.editing import EditRequest
from tavcli.settings.options import EDIT, GUIDANCE, INVERT, TUNE
from tavcli.settings.sampling import ControlSpec, EditSettings, InversionSettings
from tavcli.store.entry import Entry
from tavcli.store.specs import ClipFacts
from tavcli.workflow.plans import EditPlan
from tavcli.workflow.session import Session

__all__ = ["edit_record"]


def edit_record(
    session: Session,
    plan: EditPlan,
    request: EditRequest,
    prompt: str,
    rate: Fraction | None,
    shape: tuple[int, ...],
) -> dict[str, Any]:
    """Everything needed to reproduce the output, including the commands that would."""
    meta, entry = plan.tune.meta(), plan.entries[prompt]
    group = next(group for group in plan.groups if prompt in group)
    used = _control_record(request.control)
    return {
        "tav_version": __version__,
        "project": str(plan.project.root.resolve()),
        "environment": _environment(session.runtime.device, entry.spec["precision"]),
        "model": meta["model"],
        "clip": meta["clip"],
        "tune": {"key": plan.tune.key, **plan.tune.spec},
        "inversion": {"key": plan.inversion.key, **plan.inversion.spec},
        "edit": {"key": entry.key, **entry.spec},
        **({} if len(group) == 1 else {"batch": group}),
        **({} if used is None else {"control": used}),
        **({} if request.frames.tuned else {"frames": {**asdict(request.frames), "edited": plan.clip}}),
        **({} if not request.loras else {"loras": [{"path": str(p.resolve()), "scale": s} for p, s in request.loras]}),
        **_inversion_record(plan, request),
        "output": {
            "format": request.format,
            "fps": None if rate is None else str(rate),
            "frames": shape[0],
            "height": shape[1],
            "width": shape[2],
        },
        "reproduce": _reproduce(session, plan, request, prompt, rate),
    }


def _reproduce(session: Session, plan: EditPlan, request: EditRequest, prompt: str, rate: Fraction | None) -> list[str]:
    """The `tav tune`, `tav invert` and `tav edit` commands that compute this output again, bit for bit on
    the same device and library versions (the batch it was sampled in included)."""
    meta, tune, inversion = plan.tune.meta(), plan.tune.spec, plan.inversion.spec
    edit_spec = plan.entries[prompt].spec
    group = next(group for group in plan.groups if prompt in group)
    clip, project = meta["clip"], str(plan.project.root.resolve())
    model = parse_model_name(meta["model"]["model"])
    trust = ["--trust-pickle"] if session.allow_pickle else []
    tune_cmd = ["tav", "tune", clip["path"], tune["prompt"], "--project", project, "--model", model.base]
    tune_cmd += [] if model.config is None else ["--model-config", model.config]
    tune_cmd += [] if model.revision is None else ["--revision", model.revision]
    tune_cmd += [] if model.variant is None else ["--variant", model.variant]
    tune_cmd += [] if model.vae is None else ["--vae", model.vae]
    tune_cmd += [part for path, scale in model.loras for part in ("--lora", f"{path}:{scale}")]
    tune_cmd += [*_tune_flags(clip, tune), *_numerics(tune, meta.get("device")), *trust]
    frames = [] if request.frames.tuned else _frame_flags(request, plan.clip)
    invert_cmd = ["tav", "invert", "--project", project, "--steps", inversion["steps"], *frames]
    invert_cmd += ["--prompt", inversion["prompt"]] if inversion["prompt"] else []
    invert_cmd += _choice_flags(request) + (_fit_flags(edit_spec) if request.inversion.inversion == "null-text" else [])
    invert_cmd += [*_numerics(inversion, plan.inversion.meta().get("device")), *trust]
    edit_cmd = ["tav", "edit", *group, "--project", project, *_setting_flags(edit_spec), *frames]
    edit_cmd += [part for path, scale in request.loras for part in ("--lora", f"{path.resolve()}:{scale}")]
    edit_cmd += _choice_flags(request) + _attention_flags(request)
    edit_cmd += [] if request.format == "mp4" else ["--format", request.format]
    edit_cmd += [] if rate is None or rate == Fraction(clip["fps"]) else ["--fps", float(rate)]
    edit_cmd += ["--batch-size", len(group)] if len(group) > 1 else []
    edit_cmd += [*_numerics(edit_spec, session.runtime.device.type), *trust]
    control = _control_record(request.control)
    if control is not None:
        edit_cmd += ["--control", control["kind"], "--control-model", control["model"]]
        edit_cmd += ["--control-scale", control["scale"]]
        edit_cmd += [] if control["video"] is None else ["--control-video", control["video"]]
    return [shlex.join(map(str, cmd)) for cmd in (tune_cmd, invert_cmd, edit_cmd)]


def _tune_flags(clip: ClipFacts, tune: dict[str, Any]) -> list[Any]:
    """`--frames 24 ... --steps 500 --lr 3e-05 ...`: each `tav tune` option the tune's clip facts (frames, size)
    or key (its settings, by field name) record; one the key leaves out is at its default."""
    recorded: dict[str, Any] = {**clip, **tune}
    flags: list[Any] = []
    for option in TUNE.values():
        value = recorded.get(option.attribute)
        if value is not None and value is not False:
            flags += [option.flag] if value is True else [option.flag, value]
    return flags


def _setting_flags(edit_spec: dict[str, Any]) -> list[Any]:
    """`--steps 50 --guidance 12.5 ...`: each sampling setting as the edit's key records it (one it leaves
    out is at its default; a None seed draws nothing; an empty negative prompt is the empty prompt)."""
    recorded = [(EDIT[setting.name].flag, edit_spec.get(setting.name)) for setting in fields(EditSettings)]
    return [part for flag, value in recorded if value not in (None, "") for part in (flag, value)]


def _choice_flags(request: EditRequest) -> list[Any]:
    """`--inversion null-text --null-iterations N ...`: the inversion settings away from their defaults."""
    options = [(INVERT[s.name], getattr(request.inversion, s.name)) for s in fields(InversionSettings)]
    return [part for option, value in options if value != option.default for part in (option.flag, value)]


def _attention_flags(request: EditRequest) -> list[Any]:
    """`--cross-replace 0.8 --blend-source man ...`: the attention control settings away from their defaults
    (a repeatable one once per value)."""
    changed = request.attention.changed()
    values = [(EDIT[name].flag, value) for name, value in changed.items()]
    return [
        part
        for flag, value in values
        for one in (value if isinstance(value, tuple) else (value,))
        for part in (flag, one)
    ]


def _fit_flags(edit_spec: dict[str, Any]) -> list[Any]:
    """The guidance a null-text fit is made at, as `tav invert` takes it: each setting declared `guides` as the
    edit's key records it (one it leaves out is at its default)."""
    options = [EDIT[name] for name in GUIDANCE]
    recorded = [(o.flag, edit_spec[o.name]) for o in options if not o.key_omits_default or o.name in edit_spec]
    return [part for flag, value in recorded for part in (flag, value)]


def _inversion_record(plan: EditPlan, request: EditRequest) -> dict[str, Any]:
    """The inversion settings of an edit that does not start from plain DDIM inversion, and its null-text fit."""
    if not request.inversion.reconstructs:
        return {}
    record: dict[str, Any] = {"inversion_settings": asdict(request.inversion)}
    if isinstance(plan.unconditional, Entry):
        record["null_text"] = {"key": plan.unconditional.key, **plan.unconditional.spec}
    return record


def _frame_flags(request: EditRequest, clip: ClipFacts) -> list[Any]:
    """`--frames --stride --start` of the frames edited (as numbers: the clip may grow), and `--window`."""
    window = [] if request.frames.window is None else ["--window", request.frames.window]
    return ["--frames", clip["frames"], "--stride", clip["stride"], "--start", clip["start"], *window]


def _numerics(spec: dict[str, Any], device: str | None) -> list[str]:
    """The flags that decide how an entry's numbers were computed: precision, --compile, and the device."""
    flags = ["--precision", spec.get("precision", "fp32")] + (["--compile"] if spec.get("compile") else [])
    return flags + ([] if device is None else ["--device", device])


def _environment(device: torch.device, precision: str) -> dict[str, str]:
    """What produced an output: library versions, device and precision (bit-identical reruns need the same)."""
    import platform

    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {
        "tavcli": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": f"{device} ({name})",
        "precision": precision,
    }


def _control_record(control: ControlSpec | None) -> dict[str, Any] | None:
    """The control options as given, with local paths made absolute, so a sidecar can use them again."""
    if control is None:
        return None
    model = Path(control.model).expanduser()
    return {
        "kind": control.kind,
        "model": str(model.resolve()) if model.is_dir() else control.model,
        "video": None if control.video is None else str(control.video.resolve()),
        "scale": control.scale,
    }
