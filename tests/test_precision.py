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

from tavcli.errors import TavError
from tavcli.method.vae import decode_latents
from tavcli.method.video_unet import inflate_unet
from tavcli.runtime import resolve_runtime
from tavcli.settings.config import resolve_settings

from .conftest import CLIP, TINY_SD, RunTav

SMALL = ["-m", "tiny", "--frames", "2", "--width", "32", "--height", "32"]


def _gpus(monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]], current: int = 0) -> None:
    """Pretend this machine has CUDA GPUs of these compute capabilities (and emulated bf16 on all of them)."""
    chosen = [current]  # the current device, which `torch.cuda.set_device` changes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.__setitem__(0, torch.device(device).index))
    capability = lambda index=None: capabilities[chosen[0] if index is None else index]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"GPU {index}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulated counts


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_auto_precision_on_cuda_is_bf16_on_cards_with_bf16_cores_else_fp16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str
) -> None:
    _gpus(monkeypatch, [capability])
    assert resolve_runtime("cuda", "auto").precision == expected
    assert resolve_runtime("cuda:0", "auto").precision == expected
    assert resolve_runtime("cpu", "auto").precision == "fp32"


def test_auto_precision_asks_the_chosen_gpu_not_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, [(8, 6), (7, 5)], current=0)  # an RTX 3090 beside a T4
    assert resolve_runtime("cuda:1", "auto").precision == "fp16"
    assert resolve_runtime("cuda:0", "auto").precision == "bf16"
    _gpus(monkeypatch, [(8, 6), (7, 5)], current=1)
    assert resolve_runtime("cuda", "auto").precision == "fp16"  # plain cuda: the current device


def test_cuda_without_an_index_is_the_current_gpu_named_with_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors on a GPU say `cuda:N`; an index-less `cuda` compares unequal to it (the pre-flight then missed the
    UNet's weights already there), so `--device cuda` and `auto` resolve to the GPU with its index."""
    _gpus(monkeypatch, [(8, 6), (7, 5)], current=1)
    assert resolve_runtime("cuda", "auto").device == torch.device("cuda", 1)
    assert resolve_runtime("auto", "fp32").device == torch.device("cuda", 1)
    assert resolve_runtime("cuda:0", "auto").device == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0  # and the run's GPU is made current, for whatever asks torch


def test_a_device_that_is_not_here_is_one_line_naming_those_that_are(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, [(8, 0)])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, said in [
        ("cuda:3", "--device cuda:3: there is no CUDA GPU 3 here"),
        ("mps", "--device mps: no Apple GPU (MPS) is available here"),
        ("xpu", "--device xpu: tav runs on cpu, cuda or mps devices"),
    ]:
        with pytest.raises(TavError) as raised:
            resolve_runtime(device, "auto")
        assert raised.value.message == said and raised.value.hint == "this machine has cuda:0 (GPU 0), cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TavError, match="no CUDA GPU is available here"):
        resolve_runtime("cuda", "auto")


@pytest.mark.parametrize("mixed, expected", [("bf16", "bf16"), ("fp16", "fp16")])
def test_accelerate_mixed_precision_applies_unless_precision_is_given(
    monkeypatch: pytest.MonkeyPatch, mixed: str, expected: str
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed)
    chosen = resolve_settings({"precision": None}, None)["precision"]
    assert (chosen.value, chosen.source) == (expected, "accelerate (ACCELERATE_MIXED_PRECISION)")
    assert resolve_settings({"precision": "fp32"}, None)["precision"].value == "fp32"
    monkeypatch.setenv("TAV_PRECISION", "fp16")
    assert resolve_settings({"precision": None}, None)["precision"].value == "fp16"


@pytest.mark.parametrize("where", ["project", "user", "nowhere"])
def test_accelerates_no_leaves_the_precision_to_the_config_or_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """`accelerate launch` without --mixed_precision says `no`: not a choice of fp32, so it must not override
    the project's or the user's bf16, nor auto."""
    from tavcli.settings.config import user_config_path

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    project = tmp_path / "p.tav"
    project.mkdir()
    written = {"project": project / "tav.toml", "user": user_config_path()}.get(where)
    if written is not None:
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text('precision = "bf16"\n')
    chosen = resolve_settings({"precision": None}, project)["precision"]
    expected = ("auto", "default") if written is None else ("bf16", str(written))
    assert (chosen.value, chosen.source) == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "NO")  # accelerate's values are case-insensitive here
    assert resolve_settings({"precision": None}, project)["precision"].source == expected[1]


def test_an_unsupported_accelerate_precision_is_one_line(monkeypatch: pytest.MonkeyPatch, run_tav: RunTav) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    code, out, err = run_tav("config", "--json")
    assert code == 1 and out == "" and "mixed precision 'fp8'" in err and "Traceback" not in err
    with pytest.raises(TavError):
        resolve_settings({"precision": None}, None)


@pytest.mark.parametrize(
    "flag, expected",
    [
        (["--mixed_precision", "bf16"], {"value": "bf16", "source": "accelerate (ACCELERATE_MIXED_PRECISION)"}),
        ([], {"value": "auto", "source": "default"}),  # accelerate then says `no`: tav decides
    ],
)
def test_accelerate_launch_passes_its_mixed_precision(tmp_path: Path, flag: list[str], expected: dict) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--dynamo_backend", "no", *flag]
    done = subprocess.run([*launch, "-m", "tavcli", "config", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["precision"] == expected


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tune_invert_and_edit_in_half_precision_on_the_cpu(tmp_path: Path, run_tav: RunTav, precision: str) -> None:
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


class _StubVAE:
    """What `vae_frames` and the fp32 retry read of a VAE: its device, dtype and first block's width."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.config = type("Config", (), {"block_out_channels": [128, 256, 512, 512]})()
        self.calls: list[tuple[torch.dtype, int]] = []

    def to(self, dtype: torch.dtype) -> _StubVAE:
        self.dtype = dtype
        return self


def test_the_vae_chunk_on_a_gpu_follows_resolution_and_precision() -> None:
    from tavcli.method.vae import vae_frames

    gpu = _StubVAE("meta", torch.float16)  # any device but the CPU counts as an accelerator
    assert vae_frames(gpu, 512, 512) == 8 and vae_frames(gpu, 768, 768) == 3 and vae_frames(gpu, 256, 256) == 32
    assert vae_frames(_StubVAE("meta", torch.float32), 512, 512) == 4  # fp32 activations are twice the size


def test_the_fp32_retry_of_an_overflowing_half_vae_takes_fewer_frames_per_call() -> None:
    from tavcli.method.vae import _finite_or_fp32

    vae = _StubVAE("meta", torch.float16)

    def call(stub: _StubVAE, chunk: torch.Tensor) -> torch.Tensor:
        stub.calls.append((stub.dtype, len(chunk)))
        value = float("inf") if stub.dtype == torch.float16 else 1.0
        return torch.full((len(chunk), 8, 2, 2), value)

    pixels = torch.zeros(8, 3, 512, 512)
    out = _finite_or_fp32(vae, call, pixels)
    assert out.shape[0] == 8 and torch.isfinite(out).all() and vae.dtype == torch.float16
    assert vae.calls == [(torch.float16, 8), (torch.float32, 4), (torch.float32, 4)]
