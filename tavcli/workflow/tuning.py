"""`tav tune`: the clip's latents (encoded once), the tune and its resumable training run (checkpoints), and
previews rendered while it trains. What a request resolves to, its plan and the memory pre-flight are
`tavcli.workflow.tune_planning`'s."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from tavcli import __version__
from tavcli.errors import interruption
from tavcli.media.plots import loss_png
from tavcli.method.low_rank import add_low_rank_adapters, temporal_init_digest
from tavcli.method.training import TrainingRun, TrainState, TuneInterrupted, stop_requests, train_delta
from tavcli.method.video_unet import inflate_unet
from tavcli.models.resolving import variant_of, weight_files
from tavcli.runtime import DTYPES
from tavcli.settings.editing import EditRequest
from tavcli.settings.sampling import EditSettings
from tavcli.settings.tuning import Preview, TuneRequest, TuneSettings
from tavcli.store.checkpoints import Checkpoints
from tavcli.store.entry import LOSS_PLOT, TENSORS
from tavcli.store.specs import TuneFacts
from tavcli.workflow.editing import edit
from tavcli.workflow.keys import (
    tune_run,
)
from tavcli.workflow.remedies import naming_remedies
from tavcli.workflow.rendering import render_preview_sheet, score_edit
from tavcli.workflow.session import Artifact, Session, encode_latents, prompt_embeddings, size_time_ids
from tavcli.workflow.tune_planning import ResolvedTune, check_memory, resolve_request, tune_entry_of

if TYPE_CHECKING:  # metrics loads CLIP's image processing, which only --eval needs
    from tavcli.method.metrics import ClipScorer

__all__ = ["encode_clip", "load_train_state", "tune"]


def tune(
    session: Session,
    request: TuneRequest,
    *,
    force: bool = False,
    preview: Preview | None = None,
    scorer: ClipScorer | None = None,
) -> list[Artifact]:
    """Encode the clip (once) and tune the model on it; make the tune the project's current one.

    Training resumes from the run's latest checkpoint at or below `settings.steps`, so an
    interrupted tune goes on where it stopped and a longer tune continues a shorter one.
    With `preview`, the run pauses every `preview.every` steps: the state there is kept (as the tune
    of that many steps, the very one `--steps` makes) and the preview prompt rendered from it, scored
    with `scorer` if given; a picture of the loss curve above every preview ends the run.
    """
    settings = request.settings
    kept = list(range(preview.every, settings.steps, preview.every)) if preview else []
    artifacts: list[Artifact] = []
    previews: list[Artifact] = []
    shown = ExitStack()  # the previews' edits stay in use (`tav rm` refuses them) until the sheet shows them
    try:
        for index, steps in enumerate([*kept, settings.steps]):
            part = replace(request, settings=replace(settings, steps=steps))
            # Only the finished tune becomes the project's current one: a kept state is an edit's
            # choice (--tune-step), never what an interrupted run leaves behind.
            latents, tuned = _tune(session, part, force, fresh=force and index == 0, current=steps == settings.steps)
            artifacts += [latents, tuned] if index == 0 else [tuned]
            if steps != settings.steps:
                tuned.details["kept"] = True
            if preview is not None:
                previews.append(_render_preview(session, request.project, tuned, preview, scorer))
                project = session.project(request.project)
                shown.enter_context(project.using([project.find("edits", previews[-1].key)], "this tune"))
    except Exception as error:  # name the run's own --steps, and hand back what it had made
        shown.close()
        stopped = interruption(error)
        if stopped is None:
            raise
        if isinstance(stopped, TuneInterrupted):
            raise TuneInterrupted(stopped.step, settings.steps, [*artifacts, *previews]) from None
        if not artifacts:
            raise
        # Stopped while rendering a preview: training stood at the last kept state.
        raise TuneInterrupted(artifacts[-1].details["steps"], settings.steps, [*artifacts, *previews]) from None
    if not preview:
        return artifacts
    final = artifacts[-1]
    with shown:
        if kept:  # a kept state's tune is in the store; only the last state is needed to train on
            spec = session.project(request.project).find("tunes", final.key).spec
            Checkpoints.of_run(request.project, tune_run(spec)).discard(kept)
        return [*artifacts, *previews, render_preview_sheet(session, request.project, final, previews)]


def _render_preview(
    session: Session, project: Path, tuned: Artifact, preview: Preview, scorer: ClipScorer | None
) -> Artifact:
    """Render the preview prompt from one kept state: a short inversion and edit, the store's usual entries."""
    settings = EditSettings(steps=preview.steps)
    request = EditRequest(
        project=project, prompts=[preview.prompt], settings=settings, tune_key=tuned.key, invert_steps=preview.steps
    )
    [artifact] = edit(session, request)
    artifact.details["step"] = tuned.details["steps"]
    if scorer is not None:  # CLIP joins the device only to score, never beside the UNet while it trains
        scorer.to(session.runtime.device)
        score_edit(scorer, artifact)
        scorer.to(torch.device("cpu"))
    return artifact


def _tune(session: Session, request: TuneRequest, force: bool, fresh: bool, current: bool) -> tuple[Artifact, Artifact]:
    """The clip's latents and one tune of `request.settings.steps` steps (`fresh`: training ignores checkpoints;
    `current`: it becomes the project's current tune)."""
    resolved = resolve_request(session, request)
    latents_artifact = encode_clip(session, resolved, request, fresh)
    entry, run, checkpoints = tune_entry_of(session, request, resolved)
    source, project, settings = resolved.source, resolved.project, request.settings
    started = time.perf_counter()

    def compute() -> None:
        full = project.entry("tunes", {k: v for k, v in entry.spec.items() if k != "save_precision"})
        if entry.spec.get("save_precision") and full.complete and not fresh:
            # The same run's fp32 tune, rounded: the very tensors its training would store, with no training.
            session.reporter.note(f"rounding the fp32 tune {full.key} to {settings.save_precision} (no training)")
            params, recorded = full.tensors(), full.meta()
            kept = ("model", "clip", "losses", "temporal_init", "gradient_checkpointing", "device", "tav_version")
            facts = cast(TuneFacts, {name: recorded[name] for name in kept if name in recorded})
            facts["seconds"], facts["rounded_from"] = time.perf_counter() - started, full.key
        else:
            state, initial = _train(session, resolved, checkpoints, run, request, fresh)
            facts = {
                "model": source.identity,
                "clip": resolved.latents.meta()["clip"],
                "losses": state.losses,
                "temporal_init": initial,
                "seconds": time.perf_counter() - started,
                "gradient_checkpointing": settings.gradient_checkpointing,
                "device": session.runtime.device.type,
                "tav_version": __version__,
            }
            params = state.params
        tensors = {name: t.to(DTYPES[settings.save_precision]) for name, t in params.items()}
        title = f"{request.prompt!r}, {len(facts['losses'])} steps"
        entry.save(tensors, facts, {LOSS_PLOT: loss_png(facts["losses"], title)})
        session.forget_tuned(entry.key)

    if not current:  # pin project.json first: rebuilt when missing, it would take a lone kept state as current
        project.update_state()
    cached = project.produce(entry, compute, force, lock=f"checkpoints-{checkpoints.key}")
    if current and project.state.get("tune") != entry.key:
        project.update_state(tune=entry.key, inversion=None)
    delta_bytes = (entry.path / TENSORS).stat().st_size
    loaded = weight_files("unet", allow_pickle=True, variant=variant_of(source))
    unet_bytes = sum(f.stat().st_size for f in {f for name in loaded for f in (source.folder / "unet").glob(name)})
    details = {
        "prompt": request.prompt,
        "steps": settings.steps,
        **({"rank": settings.rank} if settings.rank else {}),
        "delta_bytes": delta_bytes,
        "base_unet_bytes": unet_bytes,
        **({"loss_plot": str(entry.path / LOSS_PLOT)} if (entry.path / LOSS_PLOT).is_file() else {}),
    }
    tuned = Artifact("tune", entry.key, entry.path, cached, time.perf_counter() - started, details)
    return latents_artifact, tuned


def encode_clip(session: Session, resolved: ResolvedTune, request: TuneRequest, force: bool) -> Artifact:
    """The clip's VAE posterior (mean, std), encoded once per model, clip content, frames and size."""
    project, source = resolved.project, resolved.source
    return encode_latents(
        session, project, resolved.latents, source.name, request.clip, request.selection, request.size, force
    )


def _train(
    session: Session,
    resolved: ResolvedTune,
    checkpoints: Checkpoints,
    run: dict[str, Any],
    request: TuneRequest,
    force: bool,
) -> tuple[TrainState, str]:
    """Train from scratch or from the latest usable checkpoint, saving checkpoints as it goes; return the final
    state and the digest of the temporal layers' initial weights (a low-rank tune re-creates them from it)."""
    runtime, settings = session.runtime, request.settings
    source, project = resolved.source, resolved.project
    components = session.model_to_train(source.name)
    time_ids = size_time_ids(session, resolved.latents.meta()["clip"], components.unet)
    unet = inflate_unet(components.unet, frame_norm=settings.frame_norm, seed=settings.seed, time_ids=time_ids)
    initial = temporal_init_digest(unet)
    resume = _resume_point(session, checkpoints, settings.steps, force)
    if resume is not None and resume.step == settings.steps:
        return resume, initial  # an earlier run reached exactly this step: nothing to train
    if settings.rank:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # the adapters' initial A: part of what the seed determines
            add_low_rank_adapters(unet, settings.rank)
    stats = resolved.latents.tensors(runtime.device)
    embeds = prompt_embeddings(session, project, source, [request.prompt])
    session.offload_frozen(source.name)  # the latents and the embedding are all tuning needs
    if runtime.device.type == "cuda":
        check_memory(unet, stats["mean"].shape, settings, runtime)
    first = resume.step if resume else 0
    written: list[int] = []  # this run's intermediate checkpoints: only the newest is kept

    def save(state: TrainState) -> None:
        checkpoints.save(state.step, *state.as_file(), run)
        checkpoints.discard([step for step in written if step != state.step])
        written[:] = [state.step]

    with (
        session.reporter.task("tuning", settings.steps, completed=first) as advance,
        stop_requests() as stop,
        naming_remedies(source.loras),
    ):
        state = train_delta(
            unet,
            components.scheduler,
            stats["mean"],
            stats["std"],
            components.vae.config.scaling_factor,
            embeds,
            _training_run(settings),
            runtime,
            advance,
            resume=resume,
            save=save,
            stop_requested=lambda: stop() or session.reporter.stop_requested(),
        )
    save(state)  # the finished run's state, so a longer tune can continue from it
    # Earlier interrupted runs' states below this one are superseded; finished tunes' states stay.
    finished = {step for step in checkpoints.steps() if project.entry("tunes", {**run, "steps": step}).complete}
    checkpoints.discard([step for step in checkpoints.steps() if step < state.step and step not in finished])
    return state, initial


def _training_run(settings: TuneSettings) -> TrainingRun:
    """The method's run of the tune settings, field by field of the same name (a new training setting is passed
    with no change here); checkpoints go to `save` every `checkpoint_every` steps."""
    shared = {run.name: getattr(settings, run.name) for run in fields(TrainingRun) if hasattr(settings, run.name)}
    return TrainingRun(**shared, save_every=settings.checkpoint_every)


def load_train_state(checkpoints: Checkpoints, step: int, device: torch.device) -> TrainState:
    """The training state saved at `step`; damage is one line naming the way out."""
    tensors, metadata = checkpoints.read(step)
    try:
        return TrainState.from_file(tensors, metadata, device)
    except (ValueError, KeyError) as error:
        raise checkpoints.damaged(step, f"its training state lacks {error}") from None


def _resume_point(session: Session, checkpoints: Checkpoints, steps: int, force: bool) -> TrainState | None:
    step = None if force else checkpoints.latest_step(at_most=steps)
    if step is None:
        return None
    state = load_train_state(checkpoints, step, session.runtime.device)
    if state.device_type != session.runtime.device.type:
        name = checkpoints.path(step).name
        session.reporter.note(f"checkpoint {name} was made on {state.device_type}: starting over")
        return None
    session.reporter.note(f"resuming from step {state.step} ({checkpoints.path(step)})")
    return state
