"""`tav edit --control`: a tiny random ControlNet from a config conditions each frame on its map."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import CLIP, RunTav

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from tavcli.method.video_unet import VideoUNet

SMALL = ["--model", "tiny", "--frames", "3", "--stride", "2", "--width", "64", "--height", "64", "--steps", "1"]


def _maps(path: Path, frames: int, values: list[int]) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width = stream.height = 96
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            image = np.zeros((96, 96, 3), np.uint8)
            image[:, : 16 + 8 * index] = values[index % len(values)]  # a moving bar: different per frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.slow
def test_control_video_conditions_the_edit_and_its_key(tiny_controlnet: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "c.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    edit: list[str | Path] = ["edit", "a dog is skiing", "-p", project, "--steps", "2"]
    plain = json.loads(run_tav(*edit)[1])
    maps = _maps(tmp_path / "pose.mp4", 12, [255])
    code, out, err = run_tav(*edit, "--control", "pose", "--control-model", tiny_controlnet, "--control-video", maps)
    assert code == 0, err
    controlled = json.loads(out)
    assert controlled["key"] != plain["key"]  # the control is part of what the edit is
    spec = json.loads((project / "edits" / controlled["key"] / "meta.json").read_text())["spec"]["control"]
    assert spec["kind"] == "pose" and spec["scale"] == 1.0 and len(spec["maps"]) == 64  # the maps' SHA-256
    a = load_file(project / "edits" / plain["key"] / "tensors.safetensors")["latents"]
    b = load_file(project / "edits" / controlled["key"] / "tensors.safetensors")["latents"]
    assert not torch.allclose(a, b)
    # The sidecar records the control: its commands and --from-sidecar render the same edit again.
    sidecar = json.loads(Path(controlled["sidecar"]).read_text())
    assert sidecar["control"]["video"] == str(maps.resolve()) and "--control-video" in sidecar["reproduce"][-1]
    Path(controlled["path"]).unlink()
    code, out, err = run_tav("edit", "--from-sidecar", controlled["sidecar"])
    assert code == 0, err
    assert json.loads(out)["key"] == controlled["key"] and Path(controlled["path"]).is_file()
    _maps(maps, 12, [128])  # another condition clip at the same path: refused, not silently different
    code, _, err = run_tav("edit", "--from-sidecar", controlled["sidecar"])
    assert code == 1 and "the condition clip" in err and "changed since" in err
    code, out, _ = run_tav(
        *edit, "--control", "pose", "--control-model", tiny_controlnet, "--control-video", maps, "--control-scale", "0"
    )
    zero = json.loads(out)
    c = load_file(project / "edits" / zero["key"] / "tensors.safetensors")["latents"]
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)  # scale 0 is no control


def test_control_mistakes_are_one_line(tiny_controlnet: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "c.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    edit: list[str | Path] = ["edit", "a dog", "-p", project, "--steps", "1"]
    cases: list[tuple[list[str | Path], str, int]] = [
        (["--control", "pose"], "--control and --control-model go together", 2),
        (["--control", "pose", "--control-model", tiny_controlnet], "needs --control-video", 2),
        (["--control", "sketchy", "--control-model", tiny_controlnet], "unknown --control 'sketchy'", 2),
        (["--control", "pose", "--control-model", tmp_path / "none", "--control-video", CLIP], "cannot load", 1),
    ]
    for args, expected, status in cases:
        code, out, err = run_tav(*edit, *args)
        assert code == status and out == "" and expected in err and "Traceback" not in err, err
    with pytest.MonkeyPatch.context() as patch:  # without OpenCV, canny maps of the source clip say what to install
        patch.setitem(sys.modules, "cv2", None)
        code, _, err = run_tav(*edit, "--control", "canny", "--control-model", tiny_controlnet)
        assert code == 1 and "pip install opencv-python-headless" in err
        assert not (project / "inversions").exists(), err  # checked before any inversion work
    shutil.rmtree(project)


@pytest.mark.slow
def test_t2i_adapter_conditions_the_edit(tmp_path: Path, run_tav: RunTav) -> None:
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=8)
    adapter.save_pretrained(tmp_path / "adapter")
    project = tmp_path / "a.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    edit: list[str | Path] = ["edit", "a dog is skiing", "-p", project, "--steps", "2"]
    plain = json.loads(run_tav(*edit)[1])
    maps = _maps(tmp_path / "sketch.mp4", 12, [255, 128])
    code, out, err = run_tav(
        *edit, "--control", "scribble", "--control-model", tmp_path / "adapter", "--control-video", maps
    )
    assert code == 0, err
    adapted = json.loads(out)
    assert adapted["key"] != plain["key"]
    a = load_file(project / "edits" / plain["key"] / "tensors.safetensors")["latents"]
    b = load_file(project / "edits" / adapted["key"] / "tensors.safetensors")["latents"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_under_windows_each_window_gets_the_residuals_of_its_own_frames(
    oracle_unet2d: UNet2DConditionModel, oracle_video_unet: VideoUNet, scheduler: DDIMScheduler, kind: str
) -> None:
    """Under `--window` the ControlNet ran on all the clip's frames at every step and each window took its slice:
    its memory grew with the clip. It runs on each window's frames alone, with the same numbers."""
    from diffusers import ControlNetModel, T2IAdapter

    from tavcli.method.control import ControlGuide
    from tavcli.method.sampling import Guidance, ddim_sample
    from tavcli.method.windows import windowed

    torch.manual_seed(0)
    model: ControlNetModel | T2IAdapter
    if kind == "controlnet":
        model = ControlNetModel.from_unet(oracle_unet2d, conditioning_embedding_out_channels=(8, 16, 32, 32))
        for param in model.parameters():  # not a fresh ControlNet's zero convolutions
            torch.nn.init.normal_(param, std=0.05)
    else:
        model = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=8)
    frames = 7  # three windows of 3: [0, 1, 2], [0, 3, 4], [0, 5, 6]
    maps = np.random.default_rng(0).integers(0, 256, (frames, 128, 128, 3), dtype=np.uint8)
    guide = ControlGuide(model.eval(), maps, 0.8)
    batches: list[int] = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    call = windowed(oracle_video_unet, 3)
    noise, text, negative = torch.randn(1, 4, frames, 16, 16), torch.randn(1, 77, 32), torch.randn(1, 77, 32)

    def all_frames(sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> Any:
        """What sampling did: the residuals of every frame, each window taking its own."""
        return call(sample, timestep, text, **guide(sample, timestep, text))

    expected = ddim_sample(all_frames, scheduler, noise, text, negative, 2, Guidance(7.5))
    batches.clear()
    out = ddim_sample(call, scheduler, noise, text, negative, 2, Guidance(7.5), control=guide)
    assert batches == ([2 * 3] * 3 * 2 if kind == "controlnet" else [])  # [uncond, cond] x 3 frames, per window
    assert torch.equal(out, expected)
