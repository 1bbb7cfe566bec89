"""Tuning: what is trained, that all of it gets gradients, and that runs are reproducible."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from tavcli.method.training import TrainingRun, TrainState, TuneInterrupted, train_delta, training_target
from tavcli.method.video_unet import VideoUNet, inflate_unet, trainable_parameters
from tavcli.progress import Reporter
from tavcli.runtime import resolve_runtime
from tavcli.store.checkpoints import Checkpoints
from tavcli.workflow.tuning import load_train_state

from .conftest import CLIP, ORACLE, TINY_SD, RunTav

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


def _video_unet(unet2d: UNet2DConditionModel) -> VideoUNet:
    unet = inflate_unet(unet2d)
    # The reference's random temporal weights: a zero-initialised to_out would block their gradients.
    unet.load_state_dict(load_file(ORACLE / "unet3d_temporal.safetensors"), strict=False)
    return unet


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_trainable_tensor_gets_a_gradient(oracle_unet2d: UNet2DConditionModel, checkpointing: bool) -> None:
    """The reference's reentrant checkpointing leaves 42 of 112 tensors without gradient; tavcli must not."""
    unet = _video_unet(oracle_unet2d).train()
    params = trainable_parameters(unet)
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    sample = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    unet(sample, torch.tensor([500]), text).sample.square().mean().backward()
    without = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    frozen_with_grad = [n for n, p in unet.named_parameters() if n not in params and p.grad is not None]
    assert frozen_with_grad == []


def _train(
    unet2d: UNet2DConditionModel,
    steps: int = 2,
    seed: int = 33,
    checkpointing: bool = False,
    precision: str = "fp32",
    weight_decay: float = 1e-2,
    **resumable: Any,
) -> tuple[VideoUNet, TrainState, list[float]]:
    torch.manual_seed(0)
    unet = inflate_unet(unet2d)
    mean = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    std = torch.full_like(mean, 0.1)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(3))
    losses: list[float] = []
    run = TrainingRun(
        steps=steps, learning_rate=1e-3, weight_decay=weight_decay, seed=seed, gradient_checkpointing=checkpointing,
        save_every=2,
    )  # fmt: skip
    scheduler = DDIMScheduler.from_pretrained(TINY_SD / "scheduler")
    runtime = resolve_runtime("cpu", precision)
    state = train_delta(
        unet, scheduler, mean, std, 0.18215, text, run, runtime, lambda loss: losses.append(loss), **resumable
    )
    return unet, state, losses


def test_resuming_from_a_saved_state_gives_the_uninterrupted_result(
    oracle_unet2d: UNet2DConditionModel, tmp_path: Path
) -> None:
    _, straight_state, straight_losses = _train(oracle_unet2d, steps=5)
    straight = straight_state.params
    saved: list[TrainState] = []
    with pytest.raises(TuneInterrupted, match="step 3 of 5"):
        _train(oracle_unet2d, steps=5, save=saved.append, stop_requested=lambda: len(saved) == 1)
    assert [state.step for state in saved] == [2, 3]  # every 2 steps, then where it was stopped
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(3, *saved[-1].as_file(), {"run": "test"})
    resumed_state = load_train_state(checkpoints, 3, torch.device("cpu"))
    assert resumed_state.step == 3 and len(resumed_state.losses) == 3
    resumed = _train(oracle_unet2d, steps=5, resume=resumed_state)[1].params
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert resumed_state.losses == straight_losses[:3]


def test_training_changes_only_the_tuned_tensors_and_is_reproducible(oracle_unet2d: UNet2DConditionModel) -> None:
    before = {name: t.clone() for name, t in oracle_unet2d.state_dict().items()}
    unet, state, losses = _train(oracle_unet2d)
    delta = state.params
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert set(delta) == set(trainable_parameters(unet))
    assert all(torch.equal(t, before[name]) for name, t in oracle_unet2d.state_dict().items())
    changed = [name for name, t in delta.items() if name in before and not torch.equal(t, before[name])]
    assert len(changed) == 32  # every attn1.to_q and attn2.to_q moved
    again = _train(oracle_unet2d)[1].params
    assert all(torch.equal(delta[name], again[name]) for name in delta)
    other_seed = _train(oracle_unet2d, seed=34)[1].params
    assert not all(torch.equal(delta[name], other_seed[name]) for name in delta)


def test_weight_decay_is_adamws_decoupled_shrink(oracle_unet2d: UNet2DConditionModel) -> None:
    """`--weight-decay` reaches AdamW: after one step, each weight differs by lr * decay * its starting value."""
    _, plain, _ = _train(oracle_unet2d, steps=1, weight_decay=0.0)
    _, decayed, _ = _train(oracle_unet2d, steps=1, weight_decay=0.5)
    torch.manual_seed(0)  # the temporal layers' initial weights, as `_train` draws them
    start = {name: t for name, t in inflate_unet(oracle_unet2d).state_dict().items() if name in plain.params}
    for name, tensor in plain.params.items():
        expected = tensor - 1e-3 * 0.5 * start[name]  # AdamW: w <- w (1 - lr wd) - lr * adam's step
        assert torch.allclose(decayed.params[name], expected, atol=1e-7), name


def test_half_precision_training_runs_autocast_and_scales_fp16_losses(oracle_unet2d: UNet2DConditionModel) -> None:
    """fp16 and bf16 on the CPU (autocast and GradScaler run there), so CI covers a GPU's code paths."""
    _, full, full_losses = _train(oracle_unet2d)
    for precision in ("fp16", "bf16"):
        _, state, losses = _train(oracle_unet2d, precision=precision)
        assert all(math.isfinite(loss) for loss in losses) and losses != full_losses  # computed in half precision
        params = state.params
        assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in params.values())  # fp32 masters
        assert sum(not torch.equal(params[n], full.params[n]) for n in params) > 0
        assert bool(state.scaler) == (precision == "fp16")  # GradScaler only where fp16's range needs it
        if state.scaler:
            assert state.scaler["scale"] > 1
    assert full.scaler == {}


def test_gradient_checkpointing_gives_the_same_delta(oracle_unet2d: UNet2DConditionModel) -> None:
    plain = _train(oracle_unet2d)[1].params
    checkpointed = _train(oracle_unet2d, checkpointing=True)[1].params
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_follows_prediction_type(prediction_type: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(TINY_SD / "scheduler", prediction_type=prediction_type)
    latents, noise = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8)
    timesteps = torch.tensor([700])
    target = training_target(scheduler, latents, noise, timesteps)
    a = scheduler.alphas_cumprod[700]
    expected = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(target, expected)


def test_reporter_base_class_is_silent() -> None:
    reporter = Reporter()
    reporter.note("nothing")
    with reporter.task("work", 3) as advance:
        advance(loss=0.5)


def test_a_half_precision_delta_shares_the_training_and_halves_the_size(tmp_path: Path, run_tav: RunTav) -> None:

    small: list[str | Path] = [
        "--model",
        "tiny",
        "--frames",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "3",
        "-p",
        tmp_path / "p.tav",
    ]
    tunes, edits = {}, {}
    for stored in ("fp32", "fp16", "bf16"):
        if stored == "fp16":  # the stored fp32 tune is enough: its rounding is what training would store
            shutil.rmtree(tmp_path / "p.tav" / "checkpoints")
        code, out, err = run_tav("tune", CLIP, "a man is skiing", *small, "--save-precision", stored)
        assert code == 0, err
        tunes[stored] = json.loads(out.splitlines()[-1])
        assert ("rounding the fp32 tune" in err) == (stored != "fp32") and "resuming" not in err, err
        code, out, err = run_tav("edit", "a cat", "-p", tmp_path / "p.tav", "--steps", "3", "-f", "frames")
        assert code == 0, err
        edits[stored] = json.loads(out.splitlines()[-1])["key"]
    assert len({t["key"] for t in tunes.values()}) == len(set(edits.values())) == 3  # each its own result
    metas = {s: json.loads((Path(t["path"]) / "meta.json").read_text()) for s, t in tunes.items()}
    assert metas["fp16"]["losses"] == metas["bf16"]["losses"] == metas["fp32"]["losses"]  # one training run
    assert metas["fp16"]["rounded_from"] == metas["bf16"]["rounded_from"] == tunes["fp32"]["key"]
    full = load_file(Path(tunes["fp32"]["path"]) / "tensors.safetensors")
    for stored, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = load_file(Path(tunes[stored]["path"]) / "tensors.safetensors")
        assert all(t.dtype == dtype and torch.equal(t, full[name].to(dtype)) for name, t in half.items())
        assert tunes[stored]["delta_bytes"] < 0.55 * tunes["fp32"]["delta_bytes"]


def test_seeded_draws_come_from_the_cpu_generator_on_every_device() -> None:
    """The same seed draws the same training noise and timesteps, and --eta noise, on a GPU as on the CPU."""
    from tavcli.method.training import _randn
    from tavcli.runtime import Runtime

    elsewhere = Runtime(torch.device("meta"), "fp32")  # stands in for a CUDA or MPS device
    generator = elsewhere.generator(7)
    assert generator.device.type == "cpu"
    noise = _randn(torch.empty(2, 4, device="meta"), generator)
    assert noise.device.type == "meta" and noise.shape == (2, 4)
    on_cpu = Runtime(torch.device("cpu"), "fp32").generator(7)
    expected = _randn(torch.empty(2, 4), on_cpu)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=on_cpu))  # drew alike
    assert expected.device.type == "cpu"
