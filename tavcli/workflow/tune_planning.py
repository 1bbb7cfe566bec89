"""A tune request resolved (its model, the clip's latents, the tune's entry, training run and checkpoints), what
`tav tune --dry-run` and `tav batch --dry-run` show of it, and the GPU memory pre-flight: nothing is trained."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import torch

from tavcli.files.hashing import file_sha256
from tavcli.media.video import probe
from tavcli.method.low_rank import add_low_rank_adapters
from tavcli.method.memory import card_fits, check_fits, probe_tune, tune_estimate
from tavcli.method.video_unet import VideoUNet, inflate_unet
from tavcli.models.conditioning import pooled_width
from tavcli.models.families import model_family
from tavcli.models.source import ModelSource
from tavcli.runtime import Runtime
from tavcli.settings.declared import named_fields
from tavcli.settings.inputs import require_folder, require_prompt
from tavcli.settings.options import MODEL_DEFAULTS, TUNE
from tavcli.settings.tuning import TuneRequest, TuneSettings
from tavcli.store.checkpoints import Checkpoints
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.workflow.keys import latents_entry, tune_run, tune_spec
from tavcli.workflow.remedies import settings_that_fit
from tavcli.workflow.session import Session

SettingsT = TypeVar("SettingsT")

__all__ = [
    "ResolvedTune",
    "check_memory",
    "resolve_request",
    "tune_entry",
    "tune_entry_of",
    "tune_plan",
    "with_model_defaults",
]


@dataclass(frozen=True)
class ResolvedTune:
    """A tune request resolved: the model it loads, its project, and the entry of the clip's latents."""

    source: ModelSource
    project: Project
    latents: Entry


def with_model_defaults(session: Session, request: TuneRequest, given: Collection[str]) -> TuneRequest:
    """`request` with its model family's own defaults (`MODEL_DEFAULTS`, by `tav tune` option name) for the
    options not in `given`, said in a note; unchanged for a family that has none (SD 1.x and 2.x)."""
    family = model_family(session.source(request.model, choose_variant=True).folder)
    chosen = {name: value for name, value in MODEL_DEFAULTS.get(family, {}).items() if name not in given}
    if not chosen:
        return request

    def defaulted(settings: SettingsT) -> SettingsT:
        changed: SettingsT = replace(cast(Any, settings), **named_fields(type(settings), TUNE, chosen))
        return changed

    listed = ", ".join(
        TUNE[name].flag if value is True else f"{TUNE[name].flag} {value}" for name, value in chosen.items()
    )
    session.reporter.note(f"{family.upper()} model: {listed} by default (what fits a 24 GB card; flags choose others)")
    selection, size, settings = defaulted(request.selection), defaulted(request.size), defaulted(request.settings)
    return replace(request, selection=selection, size=size, settings=settings)


def resolve_request(session: Session, request: TuneRequest) -> ResolvedTune:
    """Check the request's clip and project, then find its model (choosing a weights variant) and latents."""
    require_prompt(request.prompt)
    probe(request.clip, request.selection)  # a bad clip should fail before a slow model load
    require_folder(request.project, "--project")
    source = session.source(request.model, choose_variant=True)
    project = session.project(request.project)
    clip_sha256 = file_sha256(request.clip)
    latents = latents_entry(project, source, clip_sha256, request.selection, request.size, session.runtime.precision)
    return ResolvedTune(source, project, latents)


def tune_entry_of(
    session: Session, request: TuneRequest, resolved: ResolvedTune
) -> tuple[Entry, dict[str, Any], Checkpoints]:
    """The tune's entry, its training run (its spec without the steps) and that run's checkpoints."""
    runtime = session.runtime
    spec = tune_spec(resolved.latents.key, request.prompt, request.settings, runtime.precision, runtime.compile)
    run = tune_run(spec)
    return resolved.project.entry("tunes", spec), run, Checkpoints.of_run(resolved.project.root, run)


def tune_entry(session: Session, request: TuneRequest) -> Entry:
    """The store entry `request` tunes into, stored or not: what the steps after it are keyed from."""
    return tune_entry_of(session, request, resolve_request(session, request))[0]


def tune_plan(session: Session, request: TuneRequest, *, force: bool = False, memory: bool = True) -> dict[str, Any]:
    """What `tune` would reuse and compute (and, with `memory`, its estimated peak memory), computing nothing.

    `resume_from` is the step of the checkpoint training would start from (None: from scratch).
    """
    resolved = resolve_request(session, request)
    entry, _, checkpoints = tune_entry_of(session, request, resolved)
    latents, settings, size = resolved.latents, request.settings, request.size
    plan: dict[str, Any] = {
        "kind": "plan",
        "latents": {"key": latents.key, "path": str(latents.path), "cached": latents.complete and not force},
        "tune": {
            "key": entry.key,
            "path": str(entry.path),
            "cached": entry.complete and not force,
            "resume_from": None if force else checkpoints.latest_step(settings.steps),
        },
    }
    if not memory:
        return plan
    base = session.model_to_train(resolved.source.name).unet
    # The probe's memory does not depend on SDXL's size numbers, which the clip gives once it is read.
    time_ids = torch.zeros(6) if pooled_width(base.config) is not None else None
    with torch.random.fork_rng(devices=[]):
        unet = inflate_unet(base, frame_norm=request.settings.frame_norm, time_ids=time_ids)
        if settings.rank:
            add_low_rank_adapters(unet, settings.rank)  # so only the adapters count as trained
    frames, checkpointing, precision = (
        request.selection.frames,
        settings.gradient_checkpointing,
        session.runtime.precision,
    )
    probe = probe_tune(unet, precision)
    estimate = tune_estimate(unet, probe, frames, size.height, size.width, checkpointing, precision)
    return {
        **plan,
        "memory": {
            "peak_bytes": estimate.total,
            "weights_bytes": estimate.weights,
            "training_state_bytes": estimate.training_state,
            "activation_bytes": estimate.activations,
            "summary": estimate.describe(),
            "frames_that_fit": card_fits(estimate, probe),
        },
    }


def check_memory(unet: VideoUNet, shape: torch.Size, settings: TuneSettings, runtime: Runtime) -> None:
    """Stop a GPU tune that would run out of memory half-way, naming settings that fit."""
    frames, height, width = shape[2], shape[3] * 8, shape[4] * 8
    checkpointing, precision = settings.gradient_checkpointing, runtime.precision
    activations = probe_tune(unet, precision)
    estimate = tune_estimate(unet, activations, frames, height, width, checkpointing, precision)
    with settings_that_fit():
        check_fits(estimate, activations, _available(unet, runtime.device))


def _available(unet: VideoUNet, device: torch.device) -> int:
    """Bytes a tune may count on: free device memory, plus what torch caches unused, plus the UNet's weights
    already there (the estimate counts them). Everything else this process holds stays held."""
    free, _ = torch.cuda.mem_get_info(device)
    cached: int = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    resident: dict[int, int] = {
        p.data_ptr(): p.numel() * p.element_size() for p in unet.parameters() if p.device == device
    }
    return free + cached + sum(resident.values())
