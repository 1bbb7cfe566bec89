"""Memory pre-flight: the probe measures activations, the estimate scales and refuses what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F

from tavcli.errors import TavError
from tavcli.method.low_rank import add_low_rank_adapters, low_rank_parameters
from tavcli.method.memory import (
    CARDS_GIB,
    CUDA_CONTEXT,
    MAX_FRAMES,
    PROBE_FRAMES,
    TuneWontFit,
    card_fits,
    check_fits,
    probe_activations,
    probe_tune,
    tune_estimate,
)
from tavcli.method.training import trained_parameters
from tavcli.method.video_unet import VideoUNet, inflate_unet, trainable_parameters
from tavcli.runtime import Runtime
from tavcli.workflow.remedies import settings_that_fit

from .conftest import CLIP, RunTav, load_benchmark

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


# The peak of the bytes held by live tensor storages: on the CPU, what `torch.cuda.max_memory_allocated` counts on a
# GPU (without the allocator's rounding). One counter, the benchmark's, checks the estimates here and there.
LiveBytes = load_benchmark("sdxl_memory").LiveBytes


def _measured_peak(unet: VideoUNet, precision: str, frames: int, size: int) -> int:
    """Peak live bytes of a training step as `train_delta` takes it, once AdamW's moments exist."""
    params = trained_parameters(unet)
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-5)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)

    def step() -> None:
        sample = torch.randn(1, 4, frames, size // 8, size // 8)
        with Runtime(torch.device("cpu"), precision).autocast():
            prediction = unet(sample, torch.tensor([500]), text).sample
        F.mse_loss(prediction.float(), torch.randn_like(sample)).backward()
        torch.nn.utils.clip_grad_norm_(params.values(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    state = [t for moments in optimizer.state.values() for t in moments.values() if isinstance(t, torch.Tensor)]
    with LiveBytes(*unet.parameters(), *state, text) as tracker:
        step()
    unet.requires_grad_(False)
    return tracker.peak


@pytest.mark.parametrize(("precision", "rank"), [("fp32", 0), ("bf16", 0), ("fp32", 2)])
def test_the_estimate_is_within_15_percent_of_a_measured_peak(
    oracle_unet2d: UNet2DConditionModel, precision: str, rank: int
) -> None:
    torch.manual_seed(0)
    unet = inflate_unet(oracle_unet2d)
    if rank:
        add_low_rank_adapters(unet, rank)
    estimate = tune_estimate(unet, probe_tune(unet, precision), 8, 256, 256, checkpointing=False, precision=precision)
    measured = _measured_peak(unet, precision, 8, 256)
    unmargined = estimate.weights + estimate.training_state + estimate.activations
    assert unmargined == pytest.approx(measured, rel=0.15)


def test_a_low_rank_tune_trains_only_its_adapters(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    add_low_rank_adapters(unet, 2)
    adapters = low_rank_parameters(unet)
    assert trained_parameters(unet) == adapters  # peft's frozen base_layer weights do not train
    before = {name: p.requires_grad for name, p in unet.named_parameters()}
    estimate = tune_estimate(unet, probe_tune(unet, "fp32"), 4, 128, 128, checkpointing=False, precision="fp32")
    assert estimate.training_state == 3 * sum(p.numel() * 4 for p in adapters.values())
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == before  # the probe leaves no trace


def test_half_precision_is_probed_under_autocast(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    probes = probe_tune(unet, "bf16")
    fp32, half = probes["fp32"], probes["half"]
    assert (fp32.precision, half.precision) == ("fp32", "bf16")
    frozen = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in trainable_parameters(unet).values())
    # Autocast's half copies of the frozen weights: a constant that does not grow with the clip.
    assert half.constant(False) > 0.5 * 2 * frozen > fp32.constant(False)
    tokens = 8 * 32 * 32  # 8 frames at 256x256
    assert half.activations(tokens, False) > fp32.activations(tokens, False) // 2  # more than fp32's half


def test_the_probe_takes_the_sparse_causal_path(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    probe = probe_activations(unet, "fp32")
    assert min(PROBE_FRAMES) > 2  # frames from the third on attend to frame 0 and the previous frame
    assert probe.small.tokens < probe.large.tokens and probe.small.saved < probe.large.saved


def test_estimate_scales_with_the_clip_and_checkpointing_saves(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    before = {name: p.requires_grad for name, p in unet.named_parameters()}
    probes = probe_tune(unet, "fp32")
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == before  # the probe leaves no trace
    assert all(p.grad is None for p in unet.parameters())
    probe = probes["fp32"].large
    assert probe.saved > probe.inside_blocks > probe.largest_block > 0 and sum(probe.inputs) > 0
    small = tune_estimate(unet, probes, 8, 256, 256, checkpointing=False, precision="fp32")
    large = tune_estimate(unet, probes, 16, 256, 256, checkpointing=False, precision="fp32")
    longer = tune_estimate(unet, probes, 24, 256, 256, checkpointing=False, precision="fp32")
    assert longer.activations - large.activations == pytest.approx(large.activations - small.activations, rel=1e-6)
    assert large.activations > 1.9 * small.activations  # mostly a slope per token
    checkpointed = tune_estimate(unet, probes, 8, 256, 256, checkpointing=True, precision="fp32")
    assert checkpointed.activations < small.activations / 2
    assert small.weights == sum(p.numel() * 4 for p in unet.parameters())


def test_a_tune_that_does_not_fit_names_settings_that_do(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    probes = probe_tune(unet, "fp32")
    estimate = tune_estimate(unet, probes, 24, 512, 512, checkpointing=False, precision="fp32")
    check_fits(estimate, probes, available=estimate.total)  # fits exactly: no error
    with pytest.raises(TuneWontFit) as wont:  # the method reports the changes that fit
        check_fits(estimate, probes, available=int(estimate.total * 0.6))
    assert {"checkpointing": True} in wont.value.fitting
    frames = [changes["frames"] for changes in wont.value.fitting if set(changes) == {"frames"}]
    assert len(frames) == 1 and 0 < int(str(frames[0])) < 24
    with pytest.raises(TavError) as raised, settings_that_fit():  # the workflow words them as flags
        check_fits(estimate, probes, available=int(estimate.total * 0.6))
    assert "GiB is free" in raised.value.message
    assert raised.value.hint is not None and "--gradient-checkpointing" in raised.value.hint
    assert "--frames" in raised.value.hint


def test_the_card_table_gives_the_most_frames_that_fit(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    probes = probe_tune(unet, "fp32")
    estimate = tune_estimate(unet, probes, 24, 512, 512, checkpointing=False, precision="fp32")
    fits = card_fits(estimate, probes)
    assert list(fits) == [f"{gib} GB" for gib in CARDS_GIB]
    for gib in CARDS_GIB:
        usable = gib * 2**30 - CUDA_CONTEXT
        for setting, frames in fits[f"{gib} GB"].items():
            checkpointing, precision = "checkpointing" in setting, "bf16" if setting.startswith("half") else "fp32"
            if frames:
                assert tune_estimate(unet, probes, frames, 512, 512, checkpointing, precision).total <= usable
            if frames < MAX_FRAMES:
                assert tune_estimate(unet, probes, frames + 1, 512, 512, checkpointing, precision).total > usable
    first = fits["8 GB"]
    assert first["fp32"] <= first["half"] <= first["half + checkpointing"]  # each saving lets more frames fit
    assert first["fp32"] <= first["fp32 + checkpointing"]


def test_tune_dry_run_prints_a_plan_and_writes_nothing(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    small = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *small, "-p", project, "--dry-run")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["tune"]["cached"] is False and plan["memory"]["peak_bytes"] > plan["memory"]["weights_bytes"]
    assert "estimated peak" in err and "frames that fit at 64x64" in err
    assert set(plan["memory"]["frames_that_fit"]) == {"8 GB", "12 GB", "16 GB", "24 GB", "40 GB", "80 GB"}
    assert not list(project.glob("*/*"))  # no entries
    assert run_tav("tune", CLIP, "a man is skiing", *small, "-p", project)[0] == 0
    code, out, _ = run_tav("tune", CLIP, "a man is skiing", *small, "-p", project, "--dry-run")
    assert json.loads(out)["tune"]["cached"] is True
