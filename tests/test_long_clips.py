"""Editing more frames than were tuned: `--frames N|all --stride --start` and overlapping `--window`s."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import pytest
from safetensors.torch import load_file

from .conftest import CLIP, RunTav, edit_record, tav_ok

if TYPE_CHECKING:
    import torch

SMALL = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]
RATE = Fraction(30000, 1001)  # the bundled clip's


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project tuned on 4 frames at stride 2, on its own copy of the clip."""
    folder = tmp_path_factory.mktemp("long")
    shutil.copy(CLIP, folder / "clip.mp4")
    tav_ok("tune", folder / "clip.mp4", "a man is skiing", *SMALL, "-p", folder / "p.tav")
    return folder / "p.tav"


def _frames_and_rate(path: Path) -> tuple[int, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), Fraction(stream.average_rate)


def _latents(project: Path, key: str) -> torch.Tensor:
    return load_file(project / "edits" / key / "tensors.safetensors")["latents"]


@pytest.mark.slow
def test_the_tuned_selection_gives_exactly_the_edit_of_before(tuned: Path, run_tav: RunTav) -> None:
    plain = edit_record(run_tav, tuned)
    for extra in (["--frames", "4", "--stride", "2", "--start", "0"], ["--window", "4"], ["--window", "9"]):
        same = edit_record(run_tav, tuned, *extra)
        assert same["key"] == plain["key"] and same["cached"] is True, extra
    inversion = json.loads((tuned / "edits" / plain["key"] / "meta.json").read_text())["spec"]["inversion"]
    assert not {"latents", "window"} & set(
        json.loads((tuned / "inversions" / inversion / "meta.json").read_text())["spec"]
    )


@pytest.mark.slow
def test_a_window_as_long_as_the_selection_is_the_unwindowed_edit(tuned: Path, run_tav: RunTav) -> None:
    whole = edit_record(run_tav, tuned, "--frames", "8")
    for window in ("8", "20"):
        same = edit_record(run_tav, tuned, "--frames", "8", "--window", window)
        assert same["key"] == whole["key"]
    windowed = edit_record(run_tav, tuned, "--frames", "8", "--window", "4")
    assert windowed["key"] != whole["key"]
    difference = (_latents(tuned, windowed["key"]) - _latents(tuned, whole["key"])).abs()
    assert difference[:, :, :4].max() > 0  # the windows' statistics differ from the whole clip's...
    assert difference.max() < 10  # ...but it is the same clip


@pytest.mark.slow
def test_a_longer_selection_renders_its_frame_count_at_its_rate(tuned: Path, run_tav: RunTav) -> None:
    tripled = edit_record(run_tav, tuned, "--frames", "12", "--window", "4")
    assert _frames_and_rate(Path(tripled["path"])) == (12, RATE / 2)
    whole = edit_record(run_tav, tuned, "--frames", "all", "--stride", "1", "--window", "6")
    assert _frames_and_rate(Path(whole["path"])) == (48, RATE)  # the whole clip at its native rate
    late = edit_record(run_tav, tuned, "--frames", "all", "--start", "40", "--stride", "3")
    assert _frames_and_rate(Path(late["path"]))[0] == 3  # frames 40, 43, 46
    sidecar = json.loads(Path(whole["sidecar"]).read_text())
    assert sidecar["frames"]["edited"]["frames"] == 48 and "--window 6" in sidecar["reproduce"][2]
    code, out, err = run_tav("edit", "--from-sidecar", whole["sidecar"])
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["key"] == whole["key"]


@pytest.mark.slow
def test_tav_invert_takes_the_same_frames(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("invert", "-p", tuned, "--steps", "2", "--frames", "6", "--window", "3")
    assert code == 0, err
    record = json.loads(out)
    assert record["frames"] == 6 and record["window"] == 3
    trajectory = load_file(Path(record["path"]) / "tensors.safetensors")["trajectory"]
    assert trajectory.shape[3] == 6
    plain = edit_record(run_tav, tuned)  # the current inversion is of other frames: a plain edit does not take it
    assert _frames_and_rate(Path(plain["path"]))[0] == 4


def test_other_frames_need_the_tuned_clip_unchanged(tuned: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "copy.tav"
    shutil.copytree(tuned, project)
    clip = Path(json.loads(next((project / "latents").glob("*/meta.json")).read_text())["clip"]["path"])
    saved = clip.read_bytes()
    try:
        clip.write_bytes(saved + b"\0")
        code, _, err = run_tav("edit", "a dog", "-p", project, "--steps", "2", "--frames", "6")
        assert code == 1 and "has changed since the project was tuned" in err
        clip.unlink()
        code, _, err = run_tav("edit", "a dog", "-p", project, "--steps", "2", "--frames", "6")
        assert code == 1 and "is gone" in err
    finally:
        clip.write_bytes(saved)
    code, _, err = run_tav("edit", "a dog", "-p", project, "--frames", "30", "--stride", "2")
    assert code == 1 and "too few" in err
    for bad in (["--frames", "0"], ["--frames", "most"], ["--window", "1"], ["--stride", "0"]):
        code, _, err = run_tav("edit", "a dog", "-p", project, *bad)
        assert code == 2 and bad[0] in err, bad
