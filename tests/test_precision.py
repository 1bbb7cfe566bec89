"""Half precision without silent black frames: the automatic choice, accelerate's setting, tunes and
edits in fp16 and bf16 on the CPU (so CI covers the GPU's code paths; the training loop's half
precision is checked in test_tune), upcast attention, and the VAE's fp32 fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from tavcli.config import resolve_settings
from tavcli.errors import TavError
from tavcli.runtime import resolve_runtime
from tavcli.vae import decode_latents
from tavcli.video_unet import inflate_unet

from .conftest import CLIP, TINY_SD

SMALL = ["-m", "tiny", "--frames", "2", "--width", "32", "--height", "32"]


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_is_bf16_where_supported_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_runtime("cuda", "auto").precision == expected
    assert resolve_runtime("cpu", "auto").precision == "fp32"


@pytest.mark.parametrize("mixed, expected", [("bf16", "bf16"), ("fp16", "fp16"), ("no", "fp32")])
def test_accelerate_mixed_precision_applies_unless_precision_is_given(
    monkeypatch: pytest.MonkeyPatch, mixed: str, expected: str
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed)
    chosen = resolve_settings({"precision": None}, None)["precision"]
    assert (chosen.value, chosen.source) == (expected, "accelerate (ACCELERATE_MIXED_PRECISION)")
    assert resolve_settings({"precision": "fp32"}, None)["precision"].value == "fp32"
    monkeypatch.setenv("TAV_PRECISION", "fp16")
    assert resolve_settings({"precision": None}, None)["precision"].value == "fp16"


def test_an_unsupported_accelerate_precision_is_one_line(monkeypatch: pytest.MonkeyPatch, run_tav) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    code, out, err = run_tav("config", "--json")
    assert code == 1 and out == "" and "mixed precision 'fp8'" in err and "Traceback" not in err
    with pytest.raises(TavError):
        resolve_settings({"precision": None}, None)


def test_accelerate_launch_passes_its_mixed_precision(tmp_path: Path) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16"]
    done = subprocess.run([*launch, "-m", "tavcli", "config", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["precision"] == {
        "value": "bf16",
        "source": "accelerate (ACCELERATE_MIXED_PRECISION)",
    }


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tune_invert_and_edit_in_half_precision_on_the_cpu(tmp_path: Path, run_tav, precision: str) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "half.tav"
    code, out, err = run_tav(
        "tune", CLIP, "a man is skiing", *SMALL, "--steps", "2", "-p", project, "--precision", precision
    )
    assert code == 0, err
    tune = json.loads(out.splitlines()[-1])
    meta = json.loads((Path(tune["path"]) / "meta.json").read_text())
    assert meta["spec"]["precision"] == precision and all(np.isfinite(meta["losses"]))
    code, out, err = run_tav("edit", "a cat is skiing", "-p", project, "--steps", "2", "--precision", precision)
    assert code == 0, err
    record = json.loads(out.splitlines()[-1])
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    assert sidecar["edit"]["precision"] == precision
    frames = run_tav("edit", "a cat is skiing", "-p", project, "--steps", "2", "--precision", precision, "-f", "frames")
    assert frames[0] == 0, frames[2]


def _upcast_unet() -> UNet2DConditionModel:
    """The tiny UNet as SD 2.x-v builds it (`upcast_attention`), with query and key projections scaled so
    attention logits far exceed fp16's largest number (65504)."""
    config = json.loads((TINY_SD / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    config = {k: v for k, v in config.items() if not k.startswith("_")} | {"upcast_attention": True}
    unet = UNet2DConditionModel(**config)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("to_q", "to_k")):
                module.weight.mul_(60.0)
    return unet.eval()


def test_upcast_attention_stays_finite_where_fp16_logits_overflow() -> None:
    video = inflate_unet(_upcast_unet())
    for name, module in video.named_modules():
        if name.endswith("attn_temp.to_out.0"):  # a live temporal path, not the zero-initialised one
            nn.init.normal_(module.weight, std=0.02)
    sample = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    block = video.down_blocks[0].attentions[0].transformer_blocks[0]
    captured: dict[str, torch.Tensor] = {}
    handle = block.attn1.to_q.register_forward_hook(lambda m, args, out: captured.setdefault("q", out.detach()))
    with torch.no_grad():
        expected = video(sample, torch.tensor([500]), text).sample
        handle.remove()
        query = captured["q"].half()
        assert not bool(torch.isfinite(query @ query.transpose(1, 2)).all())  # a plain fp16 product overflows
        with torch.autocast("cpu", dtype=torch.float16):
            half = video(sample, torch.tensor([500]), text).sample
    # Finite, and as large as the fp32 result (logits this peaked make the softmax one-hot, so which
    # key wins may differ by fp16's rounding of the queries: elementwise agreement is not expected).
    assert bool(torch.isfinite(half).all())
    assert half.float().std().item() == pytest.approx(expected.std().item(), rel=0.5)


def test_a_half_precision_vae_that_overflows_decodes_in_fp32() -> None:
    vae = AutoencoderKL.from_pretrained(TINY_SD / "vae").eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e4)  # activations beyond fp16's range, normalised again in fp32
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = decode_latents(vae, latents)
    vae.half()
    with torch.no_grad():
        direct = vae.decode(latents[0].transpose(0, 1).half() / vae.config.scaling_factor).sample
    assert not bool(torch.isfinite(direct).all())  # without the fallback: NaN, then black frames
    frames = decode_latents(vae, latents)
    assert vae.dtype == torch.float16  # put back as it was
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
