"""`tav import`: a reference Tune-A-Video output folder stored as a tune, its frozen weights checked."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from tavcli import __version__
from tavcli.files.hashing import file_sha256
from tavcli.method.reference import extract_delta, read_reference
from tavcli.method.video_unet import inflate_unet
from tavcli.settings.tuning import TuneRequest
from tavcli.store.entry import TENSORS
from tavcli.store.specs import TuneFacts
from tavcli.workflow.keys import tune_spec
from tavcli.workflow.session import Artifact, Session
from tavcli.workflow.tune_planning import resolve_request
from tavcli.workflow.tuning import encode_clip

__all__ = ["import_tune"]


def import_tune(session: Session, request: TuneRequest, *, folder: Path) -> list[Artifact]:
    """Store the tuned tensors of a reference Tune-A-Video output folder as a tune of `request.clip`."""
    resolved = resolve_request(session, request)
    run = read_reference(folder, session.allow_pickle)
    latents_artifact = encode_clip(session, resolved, request, force=False)
    spec = {
        # The reference's UNet normalises over the clip ("joint") and trains in fp32.
        **tune_spec(resolved.latents.key, request.prompt, replace(request.settings, frame_norm="joint"), "fp32"),
        "imported": file_sha256(run.weights_file),
    }
    project, source = resolved.project, resolved.source
    entry = project.entry("tunes", spec)
    started = time.perf_counter()

    def compute() -> None:
        unet = inflate_unet(session.model_to_train(source.name).unet)
        delta = extract_delta(run.weights, unet)
        facts: TuneFacts = {
            "model": source.identity,
            "clip": resolved.latents.meta()["clip"],
            "imported_from": str(folder.resolve()),
            "losses": [],
            "tav_version": __version__,
        }
        entry.save(delta, facts)

    cached = project.produce(entry, compute)
    project.update_state(tune=entry.key, inversion=None)
    delta_bytes = (entry.path / TENSORS).stat().st_size
    details = {"prompt": request.prompt, "imported_from": str(folder), "delta_bytes": delta_bytes}
    return [latents_artifact, Artifact("tune", entry.key, entry.path, cached, time.perf_counter() - started, details)]
