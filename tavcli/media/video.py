"""Reading clips and writing results with PyAV (and Pillow for GIF and PNG frames)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
from av.codec.context import ThreadType
from PIL import GifImagePlugin, Image, ImageDraw, ImageOps

from tavcli.choices import OutputFormat
from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path
from tavcli.media.captions import drawable
from tavcli.settings.inputs import require_regular_file
from tavcli.settings.options import GIF_MAX_FPS
from tavcli.settings.tuning import FrameSelection, FrameSize

__all__ = [
    "Clip",
    "contact_sheet",
    "frame_count",
    "gif_delays",
    "read_frames",
    "side_by_side",
    "probe",
    "read_clip",
    "thumbnails",
    "write_video",
]

FALLBACK_FPS = Fraction(8)  # for inputs (some GIFs) that state no frame rate
# libx264 picks its thread count from the cores this process may use (its CPU affinity: the machine,
# taskset, OpenMP binding, a launcher's pinning) and the bytes depend on the count, so it is fixed here.
# Frame threads compress as one thread does (slices cost 4-7% in size); 4 take the time x264's own choice
# of 16 slices took on a 16-core machine.
X264_THREAD_TYPE = ThreadType.FRAME
X264_THREADS = 4
GIF_MAX_DELAY = 65535  # hundredths of a second: the format's 16-bit field


@dataclass
class Clip:
    """Selected frames as uint8 RGB (f, h, w, 3), the frame rate they play at (source fps / stride), the
    (height, width) of the upright frames as decoded, and the (top, left) of the crop taken once they were
    scaled to cover the size (0, 0 when stretched): SDXL's size conditioning."""

    frames: np.ndarray
    fps: Fraction
    original: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)


def _open(path: Path) -> av.container.InputContainer:
    require_regular_file(path, "video file")
    try:
        container = av.open(str(path))
    except PermissionError:
        raise TavError(f"cannot read {path}: permission denied") from None
    except (av.FFmpegError, OSError) as error:
        raise TavError(f"{path} is not a video file PyAV can read ({error.__class__.__name__})") from None
    if not container.streams.video:
        container.close()
        raise TavError(f"{path} has no video stream")
    return container


def probe(path: Path, selection: FrameSelection | None = None) -> None:
    """Fail early, with a clear message, if `path` is not a readable video or is too short for `selection`.

    The length check uses the frame count the container records (mp4, mov); for clips that record
    none, `read_clip` finds out while decoding.
    """
    with _open(path) as container:
        recorded = container.streams.video[0].frames
        if selection is not None and recorded and selection.last_index >= recorded:
            raise TavError(
                f"{path} has {recorded} frames, too few for {_describe(selection)}", _suggest(selection, recorded)
            )


def frame_count(path: Path) -> int:
    """How many frames `path` has: the count its container records, else counted by decoding."""
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for _ in container.decode(stream))
        except av.FFmpegError as error:
            raise TavError(f"{path} could not be decoded: {error}") from None


def _upright(frame: av.VideoFrame) -> Image.Image:
    """The frame as it is meant to be seen: phone clips store a display rotation beside upright pixels."""
    image: Image.Image = frame.to_image()
    # `rotation` is the counterclockwise turn the display matrix applies; PIL turns counterclockwise too.
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


def _fit(image: Image.Image, size: FrameSize) -> Image.Image:
    target = (size.width, size.height)
    if size.resize == "stretch":
        return image.resize(target, Image.Resampling.BICUBIC)
    return ImageOps.fit(image, target, Image.Resampling.BICUBIC)  # scale to cover, crop the centre


def crop_top_left(original: tuple[int, int], size: FrameSize) -> tuple[int, int]:
    """Where `_fit` crops frames of `original` (height, width), in the frames scaled to cover `size`."""
    if size.resize == "stretch":
        return 0, 0
    height, width = original
    scale = max(size.width / width, size.height / height)
    return round((height * scale - size.height) / 2), round((width * scale - size.width) / 2)


def read_clip(path: Path, selection: FrameSelection, size: FrameSize) -> Clip:
    """Decode the selected frames of `path`, resized to `size`."""
    probe(path, selection)
    frames: list[np.ndarray] = []
    original = (0, 0)
    decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        try:
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in selection:
                    upright = _upright(frame)
                    original = (upright.height, upright.width)
                    frames.append(np.asarray(_fit(upright, size)))
                    if len(frames) == selection.frames:
                        break
        except av.FFmpegError as error:
            raise TavError(f"{path} could not be decoded after {decoded} frames: {error}") from None
    if decoded == 0:
        raise TavError(f"{path} has a video stream but no frames", "give a clip with at least one frame")
    if len(frames) < selection.frames:
        raise TavError(f"{path} has {decoded} frames, too few for {_describe(selection)}", _suggest(selection, decoded))
    fps = Fraction(rate) if rate else FALLBACK_FPS
    return Clip(np.stack(frames), fps / selection.stride, original, crop_top_left(original, size))


def _describe(selection: FrameSelection) -> str:
    return (
        f"--frames {selection.frames} --stride {selection.stride} --start {selection.start} "
        f"(needs {selection.last_index + 1})"
    )


def _suggest(selection: FrameSelection, available: int) -> str:
    """Selections that fit `available` frames, each changing one thing: the start, the count or the stride."""
    frames, stride = selection.frames, selection.stride
    latest = available - 1 - (frames - 1) * stride  # the last start these frames and stride fit from
    fits = [f"--start {latest} (the latest for --frames {frames} --stride {stride})"] if latest >= 0 else []
    room = available - selection.start
    if room >= 1:
        fits.append(f"--frames {1 + (room - 1) // stride} --stride {stride}")
        if frames > 1 and (room - 1) // (frames - 1) >= 1:
            fits.append(f"--frames {frames} --stride {(room - 1) // (frames - 1)}")
    elif not fits:
        fits.append(f"--start 0 --frames {1 + (available - 1) // stride} --stride {stride}")
    return "try " + " or ".join(fits)


def read_frames(path: Path) -> np.ndarray:
    """Every frame of a rendered output (a video file or a folder of PNG frames), uint8 (f, h, w, 3), upright."""
    if path.is_dir():
        images = sorted(path.glob("*.png"))
        if not images:
            raise TavError(f"{path} is a folder without PNG frames")
        return np.stack([np.asarray(Image.open(image).convert("RGB")) for image in images])
    with _open(path) as container:
        try:
            decoded = container.decode(container.streams.video[0])
            frames = [np.asarray(_upright(frame).convert("RGB")) for frame in decoded]
        except av.FFmpegError as error:
            raise TavError(f"{path} could not be decoded: {error}") from None
    if not frames:
        raise TavError(f"{path} has a video stream but no frames")
    return np.stack(frames)


def thumbnails(path: Path, height: int) -> list[Image.Image]:
    """Every frame of a clip, upright, scaled to `height` pixels as it is decoded (a long clip stays small)."""
    images = []
    with _open(path) as container:
        try:
            for frame in container.decode(container.streams.video[0]):
                image = _upright(frame).convert("RGB")
                width = max(1, round(image.width * height / image.height))
                images.append(image.resize((width, height), Image.Resampling.BILINEAR))
        except av.FFmpegError as error:
            raise TavError(f"{path} could not be decoded: {error}") from None
    if not images:
        raise TavError(f"{path} has a video stream but no frames")
    return images


CAPTION_HEIGHT = 16  # pixels of caption above each clip in a grid (even, for H.264)


def side_by_side(clips: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """Clips (f, h, w, 3) of one size, left to right, each under its caption -> (f, h + 16, n*w, 3)."""
    frames, height, width = clips[0].shape[:3]
    strip = np.stack([_caption(text, width) for text in captions], axis=0)  # (n, 16, w, 3)
    tiles = [
        np.concatenate([np.broadcast_to(bar, (frames, *bar.shape)), clip], axis=1)
        for bar, clip in zip(strip, clips, strict=True)
    ]
    return np.concatenate(tiles, axis=2)


def contact_sheet(clips: list[np.ndarray], captions: list[str]) -> Image.Image:
    """One row per clip, its frames left to right, its caption above: a picture of every frame."""
    rows = []
    for clip, text in zip(clips, captions, strict=True):
        frames = np.concatenate(list(clip), axis=1)  # (h, f*w, 3)
        rows.append(np.concatenate([_caption(text, frames.shape[1]), frames], axis=0))
    return Image.fromarray(np.concatenate(rows, axis=0))


def _caption(text: str, width: int) -> np.ndarray:
    """A white strip with `text` in black, clipped to `width` pixels."""
    image = Image.new("RGB", (width, CAPTION_HEIGHT), "white")
    shown, font = drawable(text)
    ImageDraw.Draw(image).text((3, 1), shown, fill="black", font=font)
    return np.asarray(image)


def write_video(frames: np.ndarray, path: Path, fmt: OutputFormat, fps: Fraction) -> Path:
    """Write uint8 RGB frames (f, h, w, 3) atomically as H.264 mp4, GIF, or a folder of PNGs."""
    with atomic_path(path) as temp:
        if fmt == "mp4":
            _write_mp4(frames, temp, fps)
        elif fmt == "gif":
            _write_gif(frames, temp, fps)
        elif fmt == "frames":
            temp.mkdir()
            for index, frame in enumerate(frames):
                Image.fromarray(frame).save(temp / f"frame_{index:05d}.png")
        else:
            raise TavError(f"unknown output format {fmt!r}", "use mp4, gif or frames")
    return path


def gif_delays(fps: Fraction, frames: int) -> list[int]:
    """Each frame's delay in hundredths of a second (the format's unit) to play `frames` frames at `fps`
    (at most GIF_MAX_FPS): the steps between their start times rounded to hundredths, so each delay is
    within 1/100 s of 1/fps and the whole clip within 1/200 s of frames/fps."""
    step = 100 / min(fps, Fraction(GIF_MAX_FPS))
    # round half up: the difference of two such roundings is the floor or the ceiling of the step
    starts = [math.floor(index * step + Fraction(1, 2)) for index in range(frames + 1)]
    return [min(GIF_MAX_DELAY, later - earlier) for earlier, later in pairwise(starts)]


def _write_gif(frames: np.ndarray, path: Path, fps: Fraction) -> None:
    """A looping GIF with one image per frame, each with its own delay.

    Pillow's GIF writer merges a frame equal to the one before into it (adding up their delays), which
    would leave fewer frames than the clip has; so each frame is written with Pillow's per-frame helpers.
    """
    images = [Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE) for frame in frames]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0})
    with path.open("wb") as file:
        file.writelines(header)
        for index, (image, delay) in enumerate(zip(images, gif_delays(fps, len(images)), strict=True)):
            # the first image uses the header's palette, each later one its own (Pillow takes milliseconds)
            file.writelines(GifImagePlugin.getdata(image, duration=10 * delay, include_color_table=index > 0))
        file.write(b";")  # the GIF trailer


def _write_mp4(frames: np.ndarray, path: Path, fps: Fraction) -> None:
    height, width = frames.shape[1:3]
    if width % 2 or height % 2:
        raise TavError(f"H.264 needs even frame sizes, got {width}x{height}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps.limit_denominator(100_000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_type, stream.thread_count = X264_THREAD_TYPE, X264_THREADS
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
