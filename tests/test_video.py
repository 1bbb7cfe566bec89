"""Reading clips (frame selection, resizing, containers) and writing mp4 / gif / PNG frames."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from tavcli.errors import TavError
from tavcli.media.video import read_clip, read_frames, write_video
from tavcli.settings.options import GIF_MAX_FPS
from tavcli.settings.tuning import FrameSelection, FrameSize, snap_to_multiple

from .conftest import CLIP, gif_frame_count


def _decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _write_bands(path: Path, frames: int = 6, codec: str = "libx264", fmt: str | None = None) -> None:
    """A 96x32 clip of three vertical bands, red | green | blue, brightening each frame."""
    image = np.zeros((32, 96, 3), np.uint8)
    for band in range(3):
        image[:, band * 32 : (band + 1) * 32, band] = 200
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 32, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.clip(image + index * 5, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_selects_every_stride_th_frame_from_start() -> None:
    size = FrameSize(width=256, height=256, resize="stretch")
    clip = read_clip(CLIP, FrameSelection(frames=5, stride=3, start=2), size)
    assert clip.frames.shape == (5, 256, 256, 3) and clip.frames.dtype == np.uint8
    reference = _decode_all(CLIP)
    for got, index in zip(clip.frames, [2, 5, 8, 11, 14], strict=True):
        assert np.array_equal(got, reference[index])


def test_fps_is_source_rate_over_stride() -> None:
    clip = read_clip(CLIP, FrameSelection(frames=2, stride=2), FrameSize(width=64, height=64))
    assert clip.fps == Fraction(30000, 1001) / 2


def test_crop_keeps_aspect_ratio_and_stretch_squeezes(tmp_path: Path) -> None:
    path = tmp_path / "bands.mp4"
    _write_bands(path)
    selection = FrameSelection(frames=1, stride=1)
    cropped = read_clip(path, selection, FrameSize(width=32, height=32, resize="crop")).frames[0].astype(int)
    stretched = read_clip(path, selection, FrameSize(width=32, height=32, resize="stretch")).frames[0].astype(int)
    assert cropped[:, :, 1].mean() > 150 and cropped[:, :, 0].mean() < 40  # only the green centre band
    assert stretched[:, 2, 0].mean() > 150 and stretched[:, -3, 2].mean() > 150  # all three bands


@pytest.mark.parametrize("suffix", [".mkv", ".mov", ".gif"])
def test_reads_other_containers(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bands{suffix}"
    if suffix == ".gif":
        images = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(5)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    else:
        _write_bands(path)
    clip = read_clip(path, FrameSelection(frames=3, stride=2), FrameSize(width=16, height=24))
    assert clip.frames.shape == (3, 24, 16, 3)


def test_too_few_frames_says_how_many_and_what_fits() -> None:
    with pytest.raises(TavError) as error:
        read_clip(CLIP, FrameSelection(frames=30, stride=2), FrameSize(width=64, height=64))
    assert "48 frames" in error.value.message and "needs 59" in error.value.message
    assert error.value.hint is not None and "--frames 24 --stride 2" in error.value.hint


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.mp4", "no such file"),
        (lambda p: p, "is a folder"),
        (lambda p: (p / "notes.mp4").write_text("not a video") and p / "notes.mp4", "not a video file"),
    ],
    ids=["missing", "folder", "not-video"],
)
def test_bad_inputs_raise_clear_errors(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    with pytest.raises(TavError, match=message):
        read_clip(make(tmp_path), FrameSelection(frames=1), FrameSize(width=64, height=64))


def test_snap_to_multiple_of_eight() -> None:
    assert [snap_to_multiple(v) for v in (512, 500, 3, 75, 77)] == [512, 504, 8, 72, 80]


def _frames(count: int = 4, height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(count, height, width, 3), dtype=np.uint8)


def test_writes_h264_mp4_with_rate_and_size(tmp_path: Path) -> None:
    path = write_video(_frames(), tmp_path / "out.mp4", "mp4", Fraction(15000, 1001))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 48)
        assert stream.average_rate == Fraction(15000, 1001)
        assert sum(1 for _ in container.decode(stream)) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary file left behind


def test_writes_gif_and_png_frames(tmp_path: Path) -> None:
    gif = write_video(_frames(), tmp_path / "out.gif", "gif", Fraction(10))
    with Image.open(gif) as image:
        assert gif_frame_count(image) == 4 and image.info["duration"] == 100
    folder = write_video(_frames(), tmp_path / "frames", "frames", Fraction(10))
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:05d}.png" for i in range(4)]
    write_video(_frames(count=2), folder, "frames", Fraction(10))  # replacing a folder works
    assert len(list(folder.iterdir())) == 2


# Writes the frames saved in argv[1] as an mp4 at argv[2], on one core only.
ONE_CORE_WRITE = """
import os, sys
from fractions import Fraction
from pathlib import Path
import numpy as np
from tavcli.media.video import write_video
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
write_video(np.load(sys.argv[1]), Path(sys.argv[2]), "mp4", Fraction(15000, 1001))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores to give an encoder a different number of them",
)
def test_mp4_bytes_do_not_depend_on_the_cores(tmp_path: Path) -> None:
    """The same frames give the same file, written twice here and once in a process that may use one core:
    an encoder that sized its threads to the cores wrote other bytes there (pixels up to 53/255 apart)."""
    frames = _frames(count=8, height=128, width=64)  # x264 slices a frame only from 8 macroblock rows up
    np.save(tmp_path / "frames.npy", frames)
    here = [write_video(frames, tmp_path / f"here-{i}.mp4", "mp4", Fraction(15000, 1001)) for i in range(2)]
    alone = tmp_path / "one-core.mp4"
    subprocess.run([sys.executable, "-c", ONE_CORE_WRITE, tmp_path / "frames.npy", alone], check=True)
    assert here[0].read_bytes() == here[1].read_bytes() == alone.read_bytes()


def _gif_delays(path: Path) -> list[int]:
    """Each frame's delay in hundredths of a second, as a reader finds it (Pillow reports milliseconds)."""
    with Image.open(path) as image:
        return [frame.info["duration"] // 10 for frame in ImageSequence.Iterator(image)]


# NTSC rates and 45 (delays that must alternate), a whole one, and one above what GIFs play
GIF_RATES = [
    Fraction(15000, 1001),
    Fraction(24000, 1001),
    Fraction(30000, 1001),
    Fraction(45),
    Fraction(12),
    Fraction(60),
]


@pytest.mark.parametrize("fps", GIF_RATES, ids=str)
def test_gif_plays_at_the_rate_asked(tmp_path: Path, fps: Fraction) -> None:
    """Delays are whole hundredths: they vary so the clip lasts frames/fps to 1/100 s and no frame drifts
    (15000/1001 fps as 7/100 s each played 4.7% slow); above GIF_MAX_FPS, frames play at that rate."""
    count = 30
    gif = write_video(_frames(count=count, height=8, width=8), tmp_path / "out.gif", "gif", fps)
    delays = _gif_delays(gif)
    step = 100 / min(fps, Fraction(GIF_MAX_FPS))  # hundredths of a second per frame
    assert len(delays) == count
    assert abs(sum(delays) - count * step) <= Fraction(1, 2)
    assert all(abs(delay - step) < 1 for delay in delays)
    assert min(delays) >= 100 / GIF_MAX_FPS  # players slow shorter delays


def test_gif_keeps_repeated_frames(tmp_path: Path) -> None:
    """A frame equal to the one before stays a frame of its own, with its own delay."""
    frames = _frames(count=5)
    frames[2] = frames[1]
    frames[3] = frames[1]
    gif = write_video(frames, tmp_path / "still.gif", "gif", Fraction(10))
    assert _gif_delays(gif) == [10] * 5
    decoded = read_frames(gif)
    assert decoded.shape == frames.shape and np.array_equal(decoded[1], decoded[3])


def test_mp4_needs_even_sizes(tmp_path: Path) -> None:
    with pytest.raises(TavError, match="even"):
        write_video(_frames(width=63), tmp_path / "odd.mp4", "mp4", Fraction(10))
    assert list(tmp_path.iterdir()) == []


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    """A phone clip: 64x32 pixels with a 90-degree display rotation is a 32x64 picture, turned counterclockwise."""
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        pixels = np.zeros((32, 64, 3), np.uint8)
        pixels[:, :32] = 255  # left half white
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    frame = read_clip(
        path, FrameSelection(frames=1, stride=1), FrameSize(width=32, height=64, resize="stretch")
    ).frames[0]
    assert frame.shape == (64, 32, 3)
    assert frame[:24].mean() < 40 and frame[40:].mean() > 215  # the left half turned to the bottom
