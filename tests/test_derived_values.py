"""Values tav derives or says obey the same rules as given ones: frame rates in --fps's range, hints that fit
the whole selection, honest size ratios, pictures that draw any prompt, -q that is quiet, and no hub blamed
for a mistyped folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import pytest

from tavcli.errors import TavError
from tavcli.settings.tuning import FrameSelection

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import tav_ok

    project = tmp_path_factory.mktemp("derived") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "-p", project, "-q")
    return project


def test_a_rate_derived_from_a_huge_stride_stays_in_range_and_file_and_sidecar_agree(
    tuned: Path, run_tav: RunTav
) -> None:
    huge = ["--frames", "all", "--stride", "1000000000000"]
    code, out, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "1", *huge)
    assert code == 0, err
    record = json.loads(out)
    written = json.loads(Path(record["sidecar"]).read_text())["output"]["fps"]
    with av.open(record["path"]) as container:
        played = container.streams.video[0].average_rate
    assert Fraction(written) == played == Fraction(1, 100), (written, played)  # --fps's lowest
    assert "outside --fps's range: writing 0.01 fps" in err


@pytest.mark.parametrize(
    ("frames", "stride", "start", "hint"),
    [
        (4, 1, 46, "--start 44 (the latest for --frames 4 --stride 1)"),
        (4, 4, 60, "--start 35 (the latest for --frames 4 --stride 4)"),
        (30, 2, 0, "--frames 24 --stride 2"),  # the whole clip cannot hold 30 frames at stride 2 from any start
        (30, 2, 50, "--start 0 --frames 24 --stride 2"),
    ],
)
def test_the_start_hint_fits_the_frames_and_stride(frames: int, stride: int, start: int, hint: str) -> None:
    from tavcli.media.video import probe

    with pytest.raises(TavError) as raised:
        probe(CLIP, FrameSelection(frames=frames, stride=stride, start=start))  # the clip has 48 frames
    assert raised.value.hint is not None and hint in raised.value.hint, raised.value.hint
    if "--start" in hint:  # the suggestion itself fits
        suggested = int(hint.split("--start ")[1].split()[0])
        probe(CLIP, FrameSelection(frames=frames if "(the latest" in hint else 24, stride=stride, start=suggested))


def test_a_delta_larger_than_the_unet_says_so() -> None:
    from tavcli.cli.tuning import _against

    assert _against(1_000_000, 12_000_000) == "12x smaller than the UNet"
    assert _against(42_500_000, 12_969_704) == "3.3x larger than the UNet"


@pytest.mark.parametrize("text", ["a panda is skiing", "un café à Paris €", "一只熊猫在滑雪", "Ёжик 🐼 skiing"])
def test_captions_draw_every_character_or_its_code_point(text: str) -> None:
    from tavcli.media.captions import drawable, font_has

    shown, font = drawable(text)
    assert all(font_has(font, ch) for ch in shown)  # nothing is drawn as a missing-glyph box
    for ch in text:
        assert ch in shown or f"[U+{ord(ch):04X}]" in shown
    if text.isascii():
        assert shown == text


@pytest.mark.slow
def test_quiet_silences_the_libraries_warnings(tuned: Path, tiny_lora: Path, tiny_query_lora: Path) -> None:
    command = [sys.executable, "-m", "tavcli", "edit", "a cat", "-p", str(tuned), "--steps", "1", "-q"]
    loras = ["--lora", str(tiny_lora), "--lora", str(tiny_query_lora)]  # two adapters: peft warns
    done = subprocess.run([*command, *loras], capture_output=True, text=True, env={**os.environ, "TAV_DEBUG": ""})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["kind"] == "edit"


def test_a_missing_model_folder_is_not_blamed_on_the_hub(tmp_path: Path, tuned: Path, run_tav: RunTav) -> None:
    output = tmp_path / "clip.mp4"
    output.write_bytes(CLIP.read_bytes())
    code, out, err = run_tav("eval", output, "--clip-model", tmp_path / "missing-folder")
    assert code == 1 and out == "" and "cannot load the CLIP model" in err and "no such folder" in err, err
    assert "unreachable" not in err
    edit: list[str | Path] = [
        "edit", "a dog", "-p", tuned, "--steps", "1", "--control", "pose", "--control-video", CLIP
    ]  # fmt: skip
    code, out, err = run_tav(*edit, "--control-model", "./missing-controlnet")
    assert code == 1 and "cannot load the ControlNet './missing-controlnet': no such folder" in err, err


def test_a_cjk_caption_is_not_drawn_as_boxes() -> None:
    from tavcli.media.video import _caption

    boxes = _caption("\ue000\ue000\ue000\ue000", 200)  # private-use code points: every font's missing-glyph box
    assert (_caption("熊猫滑雪", 200) != boxes).any()
