"""Every bad input gets one line naming the problem and the fix, a non-zero exit, no traceback, and
leaves the store as it was; faults (full disk, damaged payloads, out of memory) are handled alike."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn, cast

import av
import numpy as np
import pytest
import torch

from .conftest import CLIP, TINY_SD, RunTav

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def _no_frames(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=24)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    container.start_encoding()  # headers with a video stream, then no frame at all
    container.close()
    return path


def _no_cross_attention_model(path: Path) -> Path:
    shutil.copytree(TINY_SD, path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["down_block_types"] = ["DownBlock2D"] * 4
    config["up_block_types"] = ["UpBlock2D"] * 4
    config["mid_block_type"] = None
    from diffusers import UNet2DConditionModel

    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    shutil.rmtree(path / "unet")
    UNet2DConditionModel(**keep).save_pretrained(path / "unet")
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CLIPS = {
    "empty": (lambda t: _write(t / "empty.mp4", b""), "not a video file"),
    "truncated": (lambda t: _write(t / "cut.mp4", CLIP.read_bytes()[:20000]), "not a video"),
    "corrupt": (lambda t: _write(t / "noise.mp4", np.random.default_rng(0).bytes(50000)), "not a video"),
    "audio-only": (lambda t: _audio_only(t / "audio.m4a"), "has no video stream"),
    "zero-frames": (lambda t: _no_frames(t / "none.mkv"), "not a video file"),
}
OPTIONS = {
    "frames-past-end": (["--frames", "30", "--stride", "2"], "has 48 frames"),
    "start-past-end": (["--start", "60"], "try --start 45 (the latest for --frames 2 --stride 2)"),
    "frames-absurd": (["--frames", "1000000000000"], "too few for --frames 1000000000000"),
}


def _fault(code: int, out: str, err: str, expected: str) -> None:
    """A failure after work started: progress lines may precede it, the error is the last line."""
    assert code == 1 and out == "" and "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and expected in last, err


def _one_error_line(code: int, out: str, err: str, expected: str) -> None:
    assert code not in (0, None), err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loading model")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CLIPS))
def test_bad_clips(case: str, tmp_path: Path, run_tav: RunTav) -> None:
    make, expected = CLIPS[case]
    clip = make(tmp_path)
    _one_error_line(*run_tav("tune", clip, "a man", *SMALL, "-p", tmp_path / "p.tav"), expected)
    assert not (tmp_path / "p.tav" / "tunes").exists()


@pytest.mark.parametrize("case", list(OPTIONS))
def test_bad_frame_options(case: str, tmp_path: Path, run_tav: RunTav) -> None:
    args, expected = OPTIONS[case]
    _one_error_line(*run_tav("tune", CLIP, "a man", *SMALL, *args, "-p", tmp_path / "p.tav"), expected)


def test_misspelled_option_suggests_the_right_one(tmp_path: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav("tune", CLIP, "a man", "--stpes", "3")
    assert code == 2 and "--steps" in err and "Traceback" not in err


def test_non_utf8_prompt_and_long_prompt(tmp_path: Path, run_tav: RunTav) -> None:
    bad = "a man \udcff skiing"  # how Python hands over undecodable argv bytes
    _one_error_line(*run_tav("tune", CLIP, bad, *SMALL, "-p", tmp_path / "p.tav"), "not valid UTF-8")
    code, _, err = run_tav("tune", CLIP, "a man is skiing " * 30, *SMALL, "-p", tmp_path / "p.tav")
    assert code == 0 and "the text encoder reads the first 77" in err


def test_models_that_cannot_work(tmp_path: Path, run_tav: RunTav) -> None:
    (tmp_path / "empty-model").mkdir()
    args: list[str | Path] = [
        "--frames", "2", "--width", "32", "--height", "32", "--steps", "1", "-p", tmp_path / "p.tav"
    ]  # fmt: skip
    code, out, err = run_tav("tune", CLIP, "a man", "--model", tmp_path / "empty-model", *args)
    _one_error_line(code, out, err, "is not a diffusers Stable Diffusion folder")
    model = _no_cross_attention_model(tmp_path / "no-cross")
    _one_error_line(*run_tav("tune", CLIP, "a man", "--model", model, *args), "has no cross-attention blocks")


@pytest.fixture
def tuned(tmp_path: Path, run_tav: RunTav) -> Path:
    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    return project


def _payloads(project: Path) -> dict[str, bytes]:
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(project.rglob("*.safetensors"))}


def test_a_damaged_payload_is_refused_never_used(tuned: Path, run_tav: RunTav) -> None:
    delta = next((tuned / "tunes").glob("*/tensors.safetensors"))
    data = bytearray(delta.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a float: still loads, but is not what was written
    delta.write_bytes(bytes(data))
    code, out, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "1")
    _fault(code, out, err, "does not match the SHA-256")
    assert "tav rm tunes/" in err
    assert not list((tuned / "edits").glob("*/meta.json")) if (tuned / "edits").exists() else True


def test_full_disk_keeps_the_old_artifact(tuned: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _payloads(tuned)
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", tuned, "--force")
    _fault(code, out, err, "no space left on the device to write")
    assert "kB)" in err and "tav gc" in err
    monkeypatch.setattr(Path, "write_bytes", real)
    assert _payloads(tuned) == before  # the old artifacts are intact
    assert not list(tuned.rglob("*.tmp"))
    assert run_tav("verify", "-p", tuned)[0] == 0


def test_out_of_memory_is_one_line_with_settings(tuned: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> NoReturn:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("tavcli.workflow.tuning.train_delta", boom)
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "2", "-p", tuned)
    _fault(code, out, err, "ran out of memory")
    assert "--gradient-checkpointing" in err


@pytest.mark.slow
def test_same_command_same_bits_and_rerender_from_sidecar(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("edit", "a dog is skiing", "-p", tuned, "--steps", "2")
    assert code == 0, err
    first = json.loads(out)
    latents = next((tuned / "edits").glob("*/tensors.safetensors")).read_bytes()
    video = Path(first["path"]).read_bytes()
    code, out, _ = run_tav("edit", "a dog is skiing", "-p", tuned, "--steps", "2", "--force")
    assert code == 0 and next((tuned / "edits").glob("*/tensors.safetensors")).read_bytes() == latents
    assert Path(first["path"]).read_bytes() == video
    sidecar = json.loads(Path(first["sidecar"]).read_text())
    assert {"torch", "diffusers", "transformers", "device", "precision"} <= set(sidecar["environment"])

    Path(first["path"]).unlink()
    code, out, err = run_tav("edit", "--from-sidecar", first["sidecar"])
    assert code == 0, err
    again = json.loads(out)
    assert again["key"] == first["key"] and again["path"] == first["path"]
    assert Path(first["path"]).read_bytes() == video
    code, _, err = run_tav("edit", "a cat", "--from-sidecar", first["sidecar"])
    assert code == 1 and "not both" in err


def test_from_sidecar_renders_only_its_prompt_and_only_the_recorded_edit(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("edit", "a cat", "a bird", "-p", tuned, "--steps", "2", "--batch-size", "2")
    assert code == 0, err
    cat, bird = (json.loads(line) for line in out.splitlines())
    for record in (cat, bird):
        Path(record["path"]).unlink()
    code, out, err = run_tav("edit", "--from-sidecar", cat["sidecar"])
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["a cat"]  # its batch sampled, it rendered
    assert Path(cat["path"]).exists() and not Path(bird["path"]).exists()

    sidecar = Path(cat["sidecar"])
    record = json.loads(sidecar.read_text())
    record["edit"]["key"] = "f" * 16  # an edit this session would not compute
    sidecar.write_text(json.dumps(record))
    edits = sorted(p.name for p in (tuned / "edits").iterdir())
    code, out, err = run_tav("edit", "--from-sidecar", sidecar, "--force")
    assert code == 1 and out == "" and f"records edit {'f' * 16}" in err
    assert "changed by hand" in err and "--precision" not in err  # the precision is not what differs
    assert sorted(p.name for p in (tuned / "edits").iterdir()) == edits  # refused before sampling


def test_run_tav_has_no_side_effects_on_sys() -> None:
    assert sys.argv  # the fixture restores argv through monkeypatch


def _clip(path: Path, width: int, height: int, pts: list[int]) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 24)
        for index, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, 24)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(
    "name, width, height, pts",
    [("huge", 3840, 2160, [0, 1]), ("variable-rate", 64, 48, [0, 1, 7, 8, 30])],
)
def test_huge_and_variable_frame_rate_clips_work(
    name: str, width: int, height: int, pts: list[int], tmp_path: Path, run_tav: RunTav
) -> None:
    clip = _clip(tmp_path / f"{name}.mp4", width, height, pts)
    code, out, err = run_tav("tune", clip, "a man", *SMALL, "--stride", "1", "-p", tmp_path / "p.tav")
    assert code == 0, err


def test_unwritable_project_is_one_line(tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)  # as a read-only folder does (tests may run as root)
    code, out, err = run_tav("tune", CLIP, "a man", *SMALL, "-p", tmp_path / "p.tav")
    _fault(code, out, err, "Permission denied")
    assert not list((tmp_path / "p.tav").glob("*/*/meta.json"))


def test_a_newer_store_is_refused(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    project.mkdir()
    (project / "project.json").write_text(json.dumps({"store_version": 99, "tune": "x"}))
    for command in (["ls"], ["edit", "a dog"], ["tune", CLIP, "a man", *SMALL]):
        _one_error_line(*run_tav(*command, "-p", project), "written by a newer tav")


def _not_regular(kind: str, folder: Path) -> tuple[Path, str]:
    """A path that is no regular file, and what tav calls it."""
    import os
    import socket

    path = folder / kind
    if kind == "fifo":
        os.mkfifo(path)
        return path, "is a FIFO (named pipe)"
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))  # closed when the test's process ends; the file stays
        return path, "is a socket"
    if kind == "loop":
        path.symlink_to(path)
        return path, "is a symbolic link loop"
    return Path("/dev/null"), "is a character device"


@pytest.mark.parametrize("kind", ["fifo", "socket", "loop", "device"])
def test_inputs_that_are_not_regular_files_are_refused_before_opening(
    kind: str, tmp_path: Path, run_tav: RunTav
) -> None:
    path, what = _not_regular(kind, tmp_path)
    cases: tuple[list[str | Path], ...] = (
        ["tune", path, "a man", *SMALL, "-p", tmp_path / "p.tav"],
        ["batch", path],
        ["edit", "--from-sidecar", path],
        ["eval", path],
        ["edit", "a dog", "-p", tmp_path, "--control", "pose", "--control-model", tmp_path, "--control-video", path],
    )
    for args in cases:
        code, out, err = run_tav(*args)  # a FIFO would block here if it were opened
        assert code in (1, 2) and out == "" and f"{path} {what}" in err and "Traceback" not in err, (args, err)


def test_a_diverging_tune_stops_at_the_step_and_stores_no_tune(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as F  # the module tavcli.method.training calls as F

    real, calls = F.mse_loss, []

    def diverging(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 2 else 1)

    monkeypatch.setattr(F, "mse_loss", diverging)
    project = tmp_path / "p.tav"
    code, out, err = run_tav("tune", CLIP, "a man", *SMALL, "--steps", "3", "-p", project)
    _fault(code, out, err, "the tune diverged at step 2 of 3: the loss is nan; no tune was stored")
    assert "--lr 3e-05 may be too high" in err and len(calls) == 2
    assert not list(project.glob("tunes/*/meta.json")) and not (project / "project.json").exists()


def test_tensors_that_diverge_while_the_loss_is_finite_are_caught(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.nn.utils.clip_grad_norm_  # the function tavcli.method.training calls

    def poisoned(params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        params = list(params)
        for param in params:
            cast(torch.Tensor, param.grad).fill_(float("inf"))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    project = tmp_path / "p.tav"
    code, out, err = run_tav("tune", CLIP, "a man", *SMALL, "-p", project)  # one step: its loss was finite
    _fault(code, out, err, "the tuned tensors hold NaN or inf")
    assert not list(project.glob("tunes/*/meta.json")) and not list(project.glob("checkpoints/*/*.safetensors"))


@pytest.mark.parametrize("stage", ["inversion", "edit", "decode"])
def test_non_finite_inversions_and_edits_are_never_stored(
    stage: str, tuned: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import AutoencoderKL  # the class tavcli.method.vae decodes with

    import tavcli.workflow.editing
    import tavcli.workflow.inversion
    from tavcli.method.inversion import ddim_inversion  # the functions tavcli.workflow's modules call
    from tavcli.method.sampling import ddim_sample

    if stage == "inversion":
        real = ddim_inversion
        monkeypatch.setattr(
            tavcli.workflow.inversion, "ddim_inversion", lambda *a, **k: [t * float("nan") for t in real(*a, **k)]
        )
    elif stage == "edit":
        real_sample = ddim_sample
        monkeypatch.setattr(tavcli.workflow.editing, "ddim_sample", lambda *a, **k: real_sample(*a, **k) * float("inf"))
    else:
        real_decode = AutoencoderKL.decode

        def nan_decode(self: AutoencoderKL, z: torch.Tensor, *a: Any, **k: Any) -> Any:
            out = real_decode(self, z, *a, **k)
            out.sample.fill_(float("nan"))
            return out

        monkeypatch.setattr(AutoencoderKL, "decode", nan_decode)
    code, out, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "2")
    _fault(code, out, err, "NaN or inf")
    kind = {"inversion": "inversions", "edit": "edits", "decode": "renders"}[stage]
    assert not list(tuned.glob(f"{kind}/*/meta.json")) and not list(tuned.glob("renders/*.mp4"))
    monkeypatch.undo()
    assert run_tav("edit", "a dog", "-p", tuned, "--steps", "2")[0] == 0  # nothing bad was left to reuse
