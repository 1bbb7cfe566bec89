"""The SDXL memory table (`benchmarks/sdxl_memory.py`): its models are the declared ones, its untouched zero
weights change no count of the probe, and its estimates move as a tune's memory does."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch

from tavcli.method.memory import MAX_FRAMES, ActivationProbe, probe_activations

from .conftest import load_benchmark

# Narrow SDXL with one transformer block per attention (not 1, 2 and 10) and one ResNet per down level: every code
# path in a tenth of the blocks, so that the probe runs in seconds.
SHALLOW = {"unet": {"transformer_layers_per_block": [1, 1, 1], "layers_per_block": 1}}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    module: ModuleType = load_benchmark("sdxl_memory")
    return module


@pytest.fixture(scope="module")
def shallow(bench: ModuleType) -> tuple[Any, ActivationProbe]:
    """The shallow narrow SDXL video UNet with zero weights, and its half-precision probe."""
    unet = bench.video_unet("sdxl", narrow=True, changes=SHALLOW)
    return unet, probe_activations(unet, "bf16")


def test_zero_weights_are_probed_as_random_ones_are(bench: ModuleType, shallow: tuple[Any, ActivationProbe]) -> None:
    unet, probe = shallow
    assert all(not p.any() for name, p in unet.named_parameters() if "_temp." not in name)
    random = bench.video_unet("sdxl", narrow=True, random=True, changes=SHALLOW)
    assert any(p.any() for name, p in random.named_parameters() if name.endswith("attn1.to_k.weight"))
    assert probe_activations(random, "bf16") == probe  # every count, block by block


def test_estimates_grow_with_the_clip_and_checkpointing_lowers_them(
    bench: ModuleType, shallow: tuple[Any, ActivationProbe]
) -> None:
    unet, probe = shallow
    result = bench.report(unet, probe)
    peaks = {(c["size"], c["frames"], c["checkpointing"]): c["peak_bytes"] for c in result["cases"]}
    assert len(peaks) == len(bench.SIZES) * len(bench.FRAMES) * 2
    for checkpointing in (False, True):
        for size in bench.SIZES:
            by_frames = [peaks[size, frames, checkpointing] for frames in bench.FRAMES]
            assert by_frames == sorted(set(by_frames))  # strictly more with every frame count
        for frames in bench.FRAMES:
            by_size = [peaks[size, frames, checkpointing] for size in bench.SIZES]
            assert by_size == sorted(set(by_size))
    for (size, frames, checkpointing), peak in peaks.items():
        if checkpointing:
            assert peak < peaks[size, frames, False]
    # The most frames a card fits is where the estimate crosses the card, and agrees with each case's verdict.
    for row in result["fitting"]:
        size, checkpointing = row["size"], row["checkpointing"]
        for card, most in row["most_frames"].items():
            gib = int(card.split()[0])
            assert 0 <= most <= MAX_FRAMES
            if most:
                assert bench.estimate(unet, probe, most, size, checkpointing).total <= bench.usable(gib)
            if most < MAX_FRAMES:
                assert bench.estimate(unet, probe, most + 1, size, checkpointing).total > bench.usable(gib)
            for case in result["cases"]:
                if case["size"] == size and case["checkpointing"] == checkpointing:
                    assert case["fits"][card] == (case["frames"] <= most)
    table = bench.tables([result | {"model": "sdxl", "seconds": {"probe": 1.0}}])
    assert table.count("| sdxl | 1024x1024 |") == len(bench.FRAMES) + 1


def test_sdxl_holds_and_trains_what_its_architecture_declares(
    bench: ModuleType, shallow: tuple[Any, ActivationProbe]
) -> None:
    """At full size, on the meta device: 4 bytes a weight and 12 a trained parameter (fp32 gradient and two AdamW
    moments), so SDXL's training state is SD 1.5's times the ratio of their trained sets (8.3x)."""
    _, probe = shallow
    counts = load_benchmark("trained_parameters").counts
    declared = {name: counts(name, [16]) for name in ("sd15", "sdxl")}
    estimates = {
        (name, rank): bench.estimate(bench.video_unet(name, rank=rank, device="meta"), probe, 8, 512, False)
        for name in ("sd15", "sdxl")
        for rank in (0, 16)
    }
    for (name, rank), estimate in estimates.items():
        trained = declared[name]["--rank 16" if rank else "trained"] * 1e6
        assert estimate.training_state == pytest.approx(12 * trained, rel=1e-6)
        if not rank:
            assert estimate.weights == pytest.approx(4 * declared[name]["video unet"] * 1e6, rel=1e-6)
    ratio = estimates["sdxl", 0].training_state / estimates["sd15", 0].training_state
    assert ratio == pytest.approx(declared["sdxl"]["trained"] / declared["sd15"]["trained"], rel=1e-6)
    assert 8 < ratio < 9
    assert estimates["sdxl", 16].training_state < estimates["sdxl", 0].training_state / 30
    assert all(p.device == torch.device("meta") for p in bench.video_unet("sdxl", device="meta").parameters())
