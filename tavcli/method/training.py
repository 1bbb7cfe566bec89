"""Training the tuned tensors on a clip's latents (docs/method.md, "Tuning"): `train_delta` runs a
`TrainingRun` (loss, AdamW, stop requests, divergence) and returns a `TrainState`, everything a resumed run
needs, which also says what a checkpoint file holds (`TrainState.as_file`)."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, SchedulerMixin
from torch import nn

from tavcli.errors import Interrupted, TavError
from tavcli.method.low_rank import low_rank_parameters
from tavcli.method.video_unet import VideoUNet, trainable_parameters
from tavcli.progress import Advance
from tavcli.runtime import Runtime

__all__ = [
    "TrainingRun",
    "TuneDiverged",
    "TuneInterrupted",
    "TrainState",
    "start_training",
    "stop_requests",
    "train_delta",
    "trained_parameters",
    "training_target",
]


@dataclass(frozen=True)
class TrainingRun:
    """What one run of `train_delta` does; the defaults are the reference's (500 AdamW steps at lr 3e-5, seed 33)."""

    steps: int = 500
    learning_rate: float = 3e-5
    weight_decay: float = 1e-2  # AdamW's, decoupled: each step scales the weights by 1 - lr * weight_decay
    seed: int = 33  # of the training noise and timesteps
    gradient_checkpointing: bool = False
    save_every: int = 0  # hand the state to `save` every N steps (0: only when stopped)


@dataclass
class TrainState:
    """Everything that determines the rest of a run: resuming from it gives the uninterrupted run's numbers."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim.AdamW.state_dict()
    scaler: dict[str, Any]  # torch.amp.GradScaler.state_dict()
    rng: torch.Tensor  # the training generator's state
    device_type: str
    losses: list[float] = field(default_factory=list)

    def as_file(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state as named tensors and string metadata: what a checkpoint file holds."""
        tensors = {f"param/{name}": t for name, t in self.params.items()}
        opt_state = self.optimizer["state"]
        tensors |= {f"optim/{i}/{k}": v for i, fields in opt_state.items() for k, v in fields.items()}
        tensors["rng"] = self.rng
        metadata = {
            "step": str(self.step),
            "losses": json.dumps(self.losses),
            "param_groups": json.dumps(self.optimizer["param_groups"]),
            "scaler": json.dumps(self.scaler),
            "device_type": self.device_type,
        }
        return tensors, metadata

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: torch.device) -> TrainState:
        """The state `as_file` described, its tensors on `device`; KeyError or ValueError if a field is missing."""
        optim: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith("optim/"):
                _, index, key = name.split("/", 2)
                optim.setdefault(int(index), {})[key] = tensor.to(device)
        return cls(
            step=int(metadata["step"]),
            params={name[6:]: t.to(device) for name, t in tensors.items() if name.startswith("param/")},
            optimizer={"state": optim, "param_groups": _json(metadata["param_groups"])},
            scaler=_json(metadata["scaler"]),
            rng=tensors["rng"],
            device_type=metadata["device_type"],
            losses=_json(metadata["losses"]),
        )


def _json(text: str) -> Any:
    """A metadata field's value; ValueError (a damaged checkpoint) however it is broken, deep nesting included."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its metadata nests too deeply") from None


class TuneDiverged(TavError):
    """The loss or the tuned tensors stopped being finite numbers: nothing of the run may be stored.

    It carries the run and its precision, so the caller can name the remedies in its own terms."""

    def __init__(self, what: str, step: int, run: TrainingRun, precision: str) -> None:
        super().__init__(f"the tune diverged at step {step} of {run.steps}: {what}; no tune was stored")
        self.run, self.precision = run, precision


class TuneInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped a tune; its state was saved at `step`.

    `made` holds the caller's records of what the run had finished before (kept states, previews),
    for the command to print before it exits.
    """

    def __init__(self, step: int, total: int, made: Sequence[object] = ()) -> None:
        super().__init__(f"tune interrupted at step {step} of {total}; its state is saved", "run it again to resume")
        self.step, self.total, self.made = step, total, tuple(made)


def train_delta(
    unet: VideoUNet,
    scheduler: SchedulerMixin,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    prompt_embeds: torch.Tensor,
    run: TrainingRun,
    runtime: Runtime,
    advance: Advance,
    resume: TrainState | None = None,
    save: Callable[[TrainState], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> TrainState:
    """Train `unet`'s tunable projections on one clip (from `resume`, if given) and return the final state.

    The clip's VAE posterior is (mean, std), each (1, 4, f, h/8, w/8); `prompt_embeds` is (1, n, d). Each
    step draws, from one seeded generator and in this order,

        z = s * (mean + std * n),   n ~ N(0, I)        (s: the VAE's scaling factor)
        eps ~ N(0, I),   t ~ U{0, ..., T-1}            (T: the scheduler's training timesteps)
        z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps

    and takes one AdamW step (the reference's settings, gradients clipped to norm 1) on

        loss = mean((unet(z_t, t, prompt) - y)^2),   y = eps, or v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * z
                                                      for v-prediction models (SD 2.x-v).

    `save` receives the state every `run.save_every` steps and, when `stop_requested()` turns true, at the
    end of the current step, after which `TuneInterrupted` is raised.
    """
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    # 1. What trains: the adapters when the tune has them, else the tuned projections.
    params = start_training(unet, run.gradient_checkpointing)
    # 2. The optimizer, the fp16 loss scaler and the generator, where `resume` left them.
    optimizer, scaler = _optimizer(params, run, runtime)
    generator = runtime.generator(run.seed)
    step, losses = _restore(resume, params, optimizer, scaler, generator)
    model = runtime.prepare(unet)  # what is called; `unet` names the parameters

    def state() -> TrainState:
        if not all(bool(torch.isfinite(param).all()) for param in params.values()):
            raise TuneDiverged("the tuned tensors hold NaN or inf", step, run, runtime.precision)
        return TrainState(
            step=step,
            params={name: param.detach().clone() for name, param in params.items()},
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            rng=generator.get_state(),
            device_type=runtime.device.type,
            losses=list(losses),
        )

    # 3. The steps: loss, its check (the one host sync per step), update, checkpoint or stop.
    while step < run.steps:
        loss = _loss(model, noise_scheduler, latent_mean, latent_std, scaling_factor, prompt_embeds, generator, runtime)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TuneDiverged(f"the loss is {loss_value}", step + 1, run, runtime.precision)
        _update(loss, params, optimizer, scaler)
        step += 1
        losses.append(loss_value)
        advance(loss=losses[-1])
        if save is not None and step < run.steps:
            if stop_requested():
                save(state())
                raise TuneInterrupted(step, run.steps)
            if run.save_every and step % run.save_every == 0:
                save(state())

    # 4. Back to inference.
    unet.eval()
    unet.disable_gradient_checkpointing()
    unet.requires_grad_(False)
    return state()


def trained_parameters(unet: VideoUNet) -> dict[str, nn.Parameter]:
    """What a tune trains: the low-rank adapters when attached (never peft's frozen `base_layer` weights),
    otherwise Tune-A-Video's projections."""
    return low_rank_parameters(unet) or trainable_parameters(unet)


def start_training(unet: VideoUNet, gradient_checkpointing: bool) -> dict[str, nn.Parameter]:
    """Make only the trained tensors require grad and put `unet` in training mode; return those tensors."""
    params = trained_parameters(unet)
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # non-reentrant in diffusers: every tensor still gets a gradient
    return params


def _optimizer(
    params: dict[str, nn.Parameter], run: TrainingRun, runtime: Runtime
) -> tuple[torch.optim.AdamW, torch.amp.GradScaler]:
    """The reference's AdamW at the run's learning rate and weight decay (fused on GPUs: one kernel for all
    tensors, the same update) and a loss scaler that is active only in fp16."""
    optimizer = torch.optim.AdamW(
        params.values(),
        lr=run.learning_rate,
        betas=(0.9, 0.999),
        weight_decay=run.weight_decay,
        eps=1e-8,
        fused=runtime.device.type == "cuda",
    )
    return optimizer, torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")


def _restore(
    resume: TrainState | None,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.AdamW,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    """Put the tensors, optimizer, scaler and generator where `resume` left them; its step and losses."""
    if resume is None:
        return 0, []
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(resume.params[name])
    optimizer.load_state_dict(resume.optimizer)
    scaler.load_state_dict(resume.scaler)
    generator.set_state(resume.rng.cpu())
    return resume.step, list(resume.losses)


def _loss(
    model: Callable[..., Any],
    noise_scheduler: DDPMScheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator,
    runtime: Runtime,
) -> torch.Tensor:
    """One step's loss (see `train_delta`), its draws taken from `generator` in the documented order."""
    latents = (latent_mean + latent_std * _randn(latent_mean, generator)) * scaling_factor
    noise = _randn(latents, generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    with runtime.autocast():
        prediction = model(noisy, timesteps, prompt_embeds).sample
    return F.mse_loss(prediction.float(), target.float())


def _update(
    loss: torch.Tensor, params: dict[str, nn.Parameter], optimizer: torch.optim.AdamW, scaler: torch.amp.GradScaler
) -> None:
    """Backward (scaled in fp16), gradients clipped to norm 1 after unscaling, one optimizer step."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params.values(), max_norm=1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C or SIGTERM into a request to stop after the current step.

    A second Ctrl-C interrupts at once. Outside the main thread signals cannot be caught: no requests.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def request(signum: int, frame: object) -> None:
        requested.set()
        signal.signal(signal.SIGINT, previous[signal.SIGINT] or signal.default_int_handler)  # a 2nd Ctrl-C: now

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models (SD 2.x)."""
    if scheduler.config.prediction_type == "v_prediction":
        velocity: torch.Tensor = scheduler.get_velocity(latents, noise, timesteps)
        return velocity
    return noise


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise shaped like `like`, drawn where `generator` lives (the CPU: see `Runtime.generator`), moved to `like`."""
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
