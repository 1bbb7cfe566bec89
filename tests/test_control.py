"""`tav edit --control`: a tiny random ControlNet from a config conditions each frame on its map."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import CLIP, RunTav

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
