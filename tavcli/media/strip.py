"""A clip's frames in a row with the ones a tune takes marked: what `--frames`, `--stride` and `--start` choose,
seen before anything is computed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from tavcli.media.captions import drawable
from tavcli.media.video import thumbnails
from tavcli.settings.tuning import FrameSelection

__all__ = ["frame_strip"]

TAKEN = (230, 60, 40)  # the border of a frame the tune takes
PER_ROW = 16
LABEL = 12  # pixels under each frame for its index


def frame_strip(path: Path, selection: FrameSelection, height: int = 48) -> Image.Image:
    """Every frame of `path` as a thumbnail, `PER_ROW` to a row, each labelled with its index; the frames
    `selection` takes are framed in red, the others dimmed."""
    frames = thumbnails(path, height)
    width = frames[0].width
    rows = (len(frames) + PER_ROW - 1) // PER_ROW
    cell_w, cell_h = width + 4, height + 4 + LABEL
    sheet = Image.new("RGB", (cell_w * min(len(frames), PER_ROW), cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for index, frame in enumerate(frames):
        left, top = (index % PER_ROW) * cell_w, (index // PER_ROW) * cell_h
        taken = index in selection
        shown = frame if taken else Image.blend(frame, Image.new("RGB", frame.size, "white"), 0.6)
        sheet.paste(shown.resize((width, height)), (left + 2, top + 2))
        if taken:
            draw.rectangle([left, top, left + cell_w - 1, top + height + 3], outline=TAKEN, width=2)
        text, font = drawable(str(index))
        draw.text((left + 3, top + height + 4), text, fill=TAKEN if taken else (120, 120, 120), font=font)
    return sheet
