"""Null-text embeddings in the store: fitted once per inversion, guidance and Adam budget, resumable.

The fit (`tavcli.method.null_text`) runs on the tuned UNet, windowed as the inversion was, under the
run's autocast, with the UNet's weights frozen (autograd then keeps nothing for their gradients). After
each step its state is saved as a checkpoint of the fit's run, so an interrupted fit goes on from the last
step done; a step whose embedding or latent is not finite stops the fit before it is saved. The finished
entry holds one embedding per step, the loss per step in its metadata and a picture of it (`loss.png`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from tavcli.errors import TavError
from tavcli.media.plots import loss_png
from tavcli.method.null_text import NullTextRun, NullTextState, optimise_null_text
from tavcli.method.windows import windowed
from tavcli.settings.sampling import EditSettings, InversionSettings
from tavcli.store.checkpoints import Checkpoints
from tavcli.store.entry import LOSS_PLOT, Entry
from tavcli.store.project import Project
from tavcli.workflow.keys import null_text_entry
from tavcli.workflow.plans import guidance_of
from tavcli.workflow.session import Artifact, Session, prompt_embeddings

__all__ = ["fit_null_text"]


def fit_null_text(
    session: Session,
    project: Project,
    *,
    tune: Entry,
    inversion: Entry,
    settings: EditSettings,
    choice: InversionSettings,
    force: bool = False,
) -> Artifact:
    """The null-text embeddings of `inversion` (made with the source prompt) at `settings`' guidance."""
    runtime = session.runtime
    entry = null_text_entry(project, inversion.key, settings, choice, runtime)
    checkpoints = Checkpoints.of_run(project.root, dict(entry.spec))
    started = time.perf_counter()
    run = NullTextRun(guidance=guidance_of(settings), iterations=choice.null_iterations, learning_rate=choice.null_lr)

    def compute() -> None:
        components, unet = session.tuned_unet(project, tune)
        trajectory = list(inversion.tensors(runtime.device)["trajectory"])
        prompt = str(inversion.spec["prompt"])
        # The source prompt's embedding from the very text-encoder call sampling makes ([prompt, ""]).
        source, empty = prompt_embeddings(session, project, components.source, [prompt, ""]).split(1)
        state = None if force else _resumed(checkpoints, runtime.device)
        if state is not None:
            session.reporter.note(f"null-text fit resumed at step {state.done} of {len(trajectory) - 1}")

        def saved(state: NullTextState) -> None:
            checkpoints.save(state.done, _state_tensors(state), {}, dict(entry.spec))
            checkpoints.discard([step for step in checkpoints.steps() if step < state.done])
            advance(loss=state.losses[-1])

        steps, done = len(trajectory) - 1, 0 if state is None else state.done
        task = session.reporter.task("null-text fitting", steps, done)
        with task as advance, runtime.autocast(), _frozen(unet):
            try:
                state = optimise_null_text(
                    windowed(unet, inversion.spec.get("window")),
                    components.scheduler,
                    trajectory,
                    source,
                    empty,
                    run,
                    state,
                    on_step=saved,
                    on_iteration=lambda iteration, loss: advance(0, iteration=iteration, loss=loss),
                )
            except FloatingPointError as error:  # before its step was saved: a rerun resumes before it
                raise TavError(str(error), _diverged_hint(runtime.precision, run.learning_rate)) from None
        facts = {
            "losses": state.losses,
            "iterations": state.iterations,
            "seconds": time.perf_counter() - started,
            "device": runtime.device.type,
        }
        title = f"null-text fit at guidance {settings.guidance:g}: loss per step"
        entry.save(
            {"embeddings": torch.stack(state.embeddings).float()}, facts, {LOSS_PLOT: loss_png(state.losses, title)}
        )
        checkpoints.discard(checkpoints.steps())
        with contextlib.suppress(OSError):  # the fit's folder of states, now empty
            checkpoints.folder.rmdir()

    cached = project.produce(entry, compute, force, lock=f"checkpoints-{checkpoints.key}")
    details = {"guidance": settings.guidance, "inversion": inversion.key, "loss_plot": str(entry.path / LOSS_PLOT)}
    return Artifact("null-text", entry.key, entry.path, cached, time.perf_counter() - started, details)


@contextlib.contextmanager
def _frozen(unet: torch.nn.Module) -> Iterator[None]:
    """`unet`'s weights without gradients while the fit runs (only the embedding is differentiated), their
    flags restored after: the tuned UNet's weights require gradients (`inflate_unet`), and autograd would
    keep every layer's input for them, in each checkpointed call's recomputation too."""
    flags = [param.requires_grad for param in unet.parameters()]
    unet.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(unet.parameters(), flags, strict=True):
            param.requires_grad_(flag)


def _state_tensors(state: NullTextState) -> dict[str, torch.Tensor]:
    """A fit's state as a checkpoint's tensors: the embeddings so far, the latent reached, losses, iterations."""
    return {
        "embeddings": torch.stack(state.embeddings).float(),
        "latent": state.latent.float(),
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "iterations": torch.tensor(state.iterations, dtype=torch.int64),
    }


def _resumed(checkpoints: Checkpoints, device: torch.device) -> NullTextState | None:
    """The state of the newest checkpoint of this fit, or None."""
    steps = checkpoints.steps()
    if not steps:
        return None
    tensors, _ = checkpoints.read(steps[-1])
    return NullTextState(
        latent=tensors["latent"].to(device),
        embeddings=list(tensors["embeddings"].to(device)),
        losses=tensors["losses"].tolist(),
        iterations=tensors["iterations"].tolist(),
    )


def _diverged_hint(precision: str, rate: float) -> str:
    """What to try when the fit's loss is not finite."""
    lower = f"a lower --null-lr than {rate:g}"
    return f"{lower}, or --precision bf16 or fp32" if precision == "fp16" else lower
