"""The `tav` command line end to end, as a user runs it (tiny models, CPU, a few steps)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from .conftest import CLIP, TINY_SD, RunTav, gif_frame_count

SMALL = ["--frames", "4", "--stride", "2", "--width", "64", "--height", "64", "--steps", "2"]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _video_facts(path: Path) -> tuple[int, int, int, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.width, stream.height, stream.average_rate


@pytest.mark.parametrize("args", [["--help"], ["tune", "--help"], ["edit", "--help"], ["--version"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['tav', *{args!r}]\n"
        "from tavcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("NO-TORCH")
    assert "Usage" in result.stdout or "tav 0." in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "tavcli", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("tav ")


@pytest.mark.slow
def test_tune_invert_edit_with_tiny_model(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "ski.tav"
    code, out, err = run_tav("tune", CLIP, "a man is skiing", "--model", "tiny", "-p", project, *SMALL)
    assert code == 0, err
    tune_records = _records(out)
    assert [r["kind"] for r in tune_records] == ["latents", "tune"]
    assert tune_records[-1]["base_unet_bytes"] >= 10 * tune_records[-1]["delta_bytes"]
    assert "tuning" in err and "loss" in err

    code, out, err = run_tav("invert", "-p", project, "--steps", "3")
    assert code == 0, err
    assert _records(out)[0]["kind"] == "inversion"

    code, out, err = run_tav("edit", "a panda is skiing", "a man is skiing at sunset", "-p", project, "--steps", "3")
    assert code == 0, err
    edits = _records(out)
    assert [r["prompt"] for r in edits] == ["a panda is skiing", "a man is skiing at sunset"]
    for record in edits:
        frames, width, height, rate = _video_facts(Path(record["path"]))
        assert (frames, width, height) == (4, 64, 64)
        assert rate == Fraction(30000, 1001) / 2
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert sidecar["edit"]["prompt"] == record["prompt"] and sidecar["inversion"]["steps"] == 3
        assert sidecar["reproduce"][0].startswith("tav tune ") and "--model tiny" in sidecar["reproduce"][0]

    # Editing again reuses everything; a new prompt reuses the tune and the inversion.
    code, out, _ = run_tav("edit", "a panda is skiing", "-p", project, "--steps", "3")
    assert _records(out)[0]["cached"] is True
    code, out, err = run_tav("tune", CLIP, "a man is skiing", "--model", "tiny", "-p", project, *SMALL)
    assert all(r["cached"] for r in _records(out))
    assert "loading model" not in err  # nothing to compute, so no model load
    inversions = list((project / "inversions").iterdir())
    code, out, _ = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "3", "--format", "gif", "--fps", "5")
    assert code == 0 and _records(out)[0]["cached"] is False
    assert list((project / "inversions").iterdir()) == inversions
    from PIL import Image

    with Image.open(_records(out)[0]["path"]) as gif:
        assert gif_frame_count(gif) == 4 and gif.info["duration"] == 200


@pytest.mark.slow
def test_local_model_folder_and_frames_output(tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "tiny-sd"
    shutil.copytree(TINY_SD, model)
    monkeypatch.chdir(tmp_path)
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    code, out, err = run_tav("tune", "clip.mp4", "a man is skiing", "--model", model, *SMALL, "--width", "32")
    assert code == 0, err
    assert (tmp_path / "clip.tav" / "project.json").exists()  # default project beside the clip
    # No --project: the only *.tav folder here is used.
    code, out, err = run_tav("edit", "a dog is skiing", "--steps", "2", "--format", "frames", "--out", "renders")
    assert code == 0, err
    frames = Path(_records(out)[0]["path"])
    assert frames.parent == Path("renders") and len(list(frames.glob("frame_*.png"))) == 4
    from PIL import Image

    with Image.open(next(frames.glob("*.png"))) as image:
        assert image.size == (32, 64)


def test_pickled_weights_need_allow_pickle(tmp_path: Path, run_tav: RunTav) -> None:
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled-sd"
    shutil.copytree(TINY_SD, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code, _, err = run_tav("tune", CLIP, "a man is skiing", "--model", model, *SMALL, "-p", tmp_path / "p.tav")
    assert code == 1 and "--trust-pickle" in err and "Traceback" not in err
    code, _, err = run_tav(
        "tune", CLIP, "a man is skiing", "--model", model, *SMALL, "-p", tmp_path / "p.tav", "--trust-pickle"
    )
    assert code == 0, err


def _untuned(tmp_path: Path) -> Path:
    (tmp_path / "empty.tav").mkdir()
    return tmp_path / "empty.tav"


BAD_INPUTS = {
    "missing-file": (lambda t: ["tune", t / "nope.mp4", "a man", "-m", "tiny"], "no such file"),
    "not-a-video": (lambda t: ["tune", TINY_SD / "model_index.json", "a man", "-m", "tiny"], "not a video file"),
    "folder": (lambda t: ["tune", t, "a man", "-m", "tiny"], "is a folder"),
    "too-few-frames": (lambda t: ["tune", CLIP, "a man", "-m", "tiny", "--frames", "40"], "has 48 frames"),
    "empty-prompt": (lambda t: ["tune", CLIP, "  ", "-m", "tiny"], "prompt is empty"),
    "empty-edit-prompt": (lambda t: ["edit", "a dog", "", "-p", _untuned(t)], "prompt is empty"),
    "unknown-model": (lambda t: ["tune", CLIP, "a man", "-m", "no such model"], "unknown model"),
    "hub-offline": (lambda t: ["tune", CLIP, "a man", "-m", "tavcli-test/missing"], "--model tiny"),
    "edit-untuned": (lambda t: ["edit", "a dog", "-p", _untuned(t)], "never tuned"),
    "invert-untuned": (lambda t: ["invert", "-p", _untuned(t)], "never tuned"),
    "edit-no-project": (lambda t: ["edit", "a dog", "-p", t / "none.tav"], "no project"),
    "cuda-absent": (lambda t: ["tune", CLIP, "a man", "-m", "tiny", "--device", "cuda"], "no CUDA GPU"),
    "project-is-a-file": (lambda t: ["tune", CLIP, "a man", "-m", "tiny", "-p", CLIP], "is a file"),
    "out-is-a-file": (lambda t: ["edit", "a dog", "-p", _untuned(t), "--out", CLIP], "is a file"),
}
USAGE_ERRORS = {"empty-prompt", "empty-edit-prompt"}  # a command-line mistake: status 2, as for a bad option


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(
    case: str, tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_args, expected = BAD_INPUTS[case]
    code, out, err = run_tav(*make_args(tmp_path))
    assert code == (2 if case in USAGE_ERRORS else 1)
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loading model")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not list(tmp_path.glob("*.tav/tunes"))  # nothing half-written


@pytest.mark.slow
def test_batched_edits_are_their_own_entries_close_to_one_at_a_time(tmp_path: Path, run_tav: RunTav) -> None:
    from safetensors.torch import load_file

    prompts = ["a panda is skiing", "a dog is skiing", "a cat is skiing"]
    project = tmp_path / "b.tav"
    assert run_tav("tune", CLIP, "a man is skiing", "--model", "tiny", "-p", project, *SMALL)[0] == 0
    results = {}
    for batch in ("1", "3"):
        code, out, err = run_tav("edit", *prompts, "-p", project, "--steps", "3", "--batch-size", batch)
        assert code == 0, err
        records = _records(out)
        assert [r["prompt"] for r in records] == prompts and all(Path(r["path"]).exists() for r in records)
        assert not any(r["cached"] for r in records)  # a batch rounds differently: never the unbatched entry
        results[batch] = records
    for single, batched in zip(results["1"], results["3"], strict=True):
        assert single["key"] != batched["key"] and single["path"] != batched["path"]
        a = load_file(project / "edits" / single["key"] / "tensors.safetensors")["latents"]
        b = load_file(project / "edits" / batched["key"] / "tensors.safetensors")["latents"]
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)  # the same edit up to float rounding
        sidecar = json.loads(Path(batched["sidecar"]).read_text())
        assert sidecar["batch"] == prompts and sidecar["edit"]["batch"] == 3
        assert "--batch-size 3" in sidecar["reproduce"][2] and all(p in sidecar["reproduce"][2] for p in prompts)
    code, out, _ = run_tav("edit", *prompts, "-p", project, "--steps", "3", "--batch-size", "3")
    assert code == 0 and all(r["cached"] for r in _records(out))


@pytest.mark.slow
def test_grid_writes_side_by_side_clips_and_a_contact_sheet(tmp_path: Path, run_tav: RunTav) -> None:
    from PIL import Image

    project = tmp_path / "g.tav"
    assert run_tav("tune", CLIP, "a man is skiing", "--model", "tiny", "-p", project, *SMALL)[0] == 0
    code, out, err = run_tav("edit", "a panda is skiing", "a dog is skiing", "-p", project, "--steps", "2", "--grid")
    assert code == 0, err
    grid = _records(out)[-1]
    assert grid["kind"] == "grid" and grid["prompts"] == ["a panda is skiing", "a dog is skiing"]
    frames, width, height, _ = _video_facts(Path(grid["path"]))
    assert (frames, width, height) == (4, 3 * 64, 64 + 16)  # source | edit | edit, captions above
    with Image.open(grid["gif"]) as gif:
        assert gif_frame_count(gif) == 4 and gif.size == (192, 80)
    with Image.open(grid["sheet"]) as sheet:
        assert sheet.size == (4 * 64, 3 * (64 + 16))  # one row per clip, every frame


@pytest.mark.slow
def test_v_prediction_model_end_to_end(tmp_path: Path, run_tav: RunTav) -> None:
    """SD 2.x models predict the velocity: tune, invert and edit must follow the scheduler's prediction type."""
    model = tmp_path / "tiny-v"
    shutil.copytree(TINY_SD, model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    project = tmp_path / "v.tav"
    args: list[str | Path] = ["--model", model, "--frames", "3", "--width", "32", "--height", "32", "--steps", "2"]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *args, "-p", project)
    assert code == 0, err
    losses = json.loads((Path(_records(out)[-1]["path"]) / "meta.json").read_text())["losses"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "3")
    assert code == 0, err
    assert _video_facts(Path(_records(out)[0]["path"]))[:3] == (3, 32, 32)
    epsilon = tmp_path / "eps.tav"  # the same inputs with the epsilon model tune differently
    eps_args: list[str | Path] = ["--model", TINY_SD, *args[2:]]
    assert run_tav("tune", CLIP, "a man is skiing", *eps_args, "-p", epsilon)[0] == 0
    eps_losses = json.loads(next((epsilon / "tunes").glob("*/meta.json")).read_text())["losses"]
    assert eps_losses != losses
