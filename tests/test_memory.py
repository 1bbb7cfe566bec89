"""Memory pre-flight: the probe measures activations, the estimate scales and refuses what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tavcli.errors import TavError
from tavcli.memory import CARDS_GIB, CUDA_CONTEXT, MAX_FRAMES, card_fits, check_fits, probe_activations, tune_estimate
from tavcli.video_unet import inflate_unet, trainable_parameters

from .conftest import CLIP


def test_estimate_scales_with_the_clip_and_checkpointing_saves(oracle_unet2d) -> None:  # type: ignore[no-untyped-def]
    unet = inflate_unet(oracle_unet2d)
    before = {name: p.requires_grad for name, p in unet.named_parameters()}
    probe = probe_activations(unet)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == before  # the probe leaves no trace
    assert all(p.grad is None for p in trainable_parameters(unet).values())
    assert probe.saved > probe.inside_blocks > probe.largest_block > 0 and probe.block_inputs > 0
    small = tune_estimate(unet, probe, 8, 256, 256, checkpointing=False, precision="fp32")
    large = tune_estimate(unet, probe, 16, 256, 256, checkpointing=False, precision="fp32")
    assert large.activations == pytest.approx(2 * small.activations, rel=1e-6)
    checkpointed = tune_estimate(unet, probe, 8, 256, 256, checkpointing=True, precision="fp32")
    assert checkpointed.activations < small.activations / 2
    half = tune_estimate(unet, probe, 8, 256, 256, checkpointing=False, precision="bf16")
    assert half.activations == small.activations // 2
    assert small.weights == sum(p.numel() * 4 for p in unet.parameters())


def test_a_tune_that_does_not_fit_names_settings_that_do(oracle_unet2d) -> None:  # type: ignore[no-untyped-def]
    unet = inflate_unet(oracle_unet2d)
    probe = probe_activations(unet)
    estimate = tune_estimate(unet, probe, 24, 512, 512, checkpointing=False, precision="fp32")
    check_fits(estimate, probe, available=estimate.total)  # fits exactly: no error
    with pytest.raises(TavError) as raised:
        check_fits(estimate, probe, available=int(estimate.total * 0.6))
    assert "GiB is free" in raised.value.message
    assert raised.value.hint is not None and "--gradient-checkpointing" in raised.value.hint
    assert "--frames" in raised.value.hint


def test_the_card_table_gives_the_most_frames_that_fit(oracle_unet2d) -> None:  # type: ignore[no-untyped-def]
    unet = inflate_unet(oracle_unet2d)
    probe = probe_activations(unet)
    estimate = tune_estimate(unet, probe, 24, 512, 512, checkpointing=False, precision="fp32")
    fits = card_fits(estimate, probe)
    assert list(fits) == [f"{gib} GB" for gib in CARDS_GIB]
    for gib in CARDS_GIB:
        usable = gib * 2**30 - CUDA_CONTEXT
        for setting, frames in fits[f"{gib} GB"].items():
            checkpointing, precision = "checkpointing" in setting, "bf16" if setting.startswith("half") else "fp32"
            if frames:
                assert tune_estimate(unet, probe, frames, 512, 512, checkpointing, precision).total <= usable
            if frames < MAX_FRAMES:
                assert tune_estimate(unet, probe, frames + 1, 512, 512, checkpointing, precision).total > usable
    first = fits["8 GB"]
    assert first["fp32"] <= first["half"] <= first["half + checkpointing"]  # each saving lets more frames fit
    assert first["fp32"] <= first["fp32 + checkpointing"]


def test_tune_dry_run_prints_a_plan_and_writes_nothing(tmp_path: Path, run_tav) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "p.tav"
    small = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *small, "-p", project, "--dry-run")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["tune"]["cached"] is False and plan["memory"]["peak_bytes"] > plan["memory"]["weights_bytes"]
    assert "estimated peak" in err and "frames that fit at 64x64" in err
    assert set(plan["memory"]["frames_that_fit"]) == {"8 GB", "12 GB", "16 GB", "24 GB"}
    assert not list(project.glob("*/*"))  # no entries
    assert run_tav("tune", CLIP, "a man is skiing", *small, "-p", project)[0] == 0
    code, out, _ = run_tav("tune", CLIP, "a man is skiing", *small, "-p", project, "--dry-run")
    assert json.loads(out)["tune"]["cached"] is True
