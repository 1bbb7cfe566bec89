"""Loss-curve pictures, so a user can pick a tune's step count by eye (Pillow and numpy only, no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tavcli.media.captions import drawable

__all__ = ["loss_curve", "loss_png"]

PLOT_WIDTH, PLOT_HEIGHT = 800, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 30, 34, 40  # margins: y labels left, title on top, x labels below
SIZE = (LEFT + PLOT_WIDTH + RIGHT, TOP + PLOT_HEIGHT + BOTTOM)
RAW_COLOUR = (170, 200, 240)
AVERAGE_COLOUR = (20, 60, 160)
MARK_COLOUR = (200, 60, 60)
AXIS_COLOUR = (90, 90, 90)
GRID_COLOUR = (232, 232, 232)


def loss_curve(losses: Sequence[float], marks: Sequence[int] = (), title: str = "") -> Image.Image:
    """A PNG-ready RGB picture of a tune's loss per step (step 1 = losses[0]).

    The raw losses are a light line, their moving average (window about len/20) a dark one; the y axis has
    min/middle/max labels, the x axis the first step, a few round ticks and the last; each step in `marks`
    (e.g. the kept states) gets a dashed vertical line with its number. Non-finite losses are skipped.
    """
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no losses to plot")
    count = values.size
    steps = np.arange(1, count + 1)
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    # Pad the range so the curve never sits on the frame; a flat series gets a band around its value.
    pad = (hi - lo) * 0.05 or (abs(hi) * 0.05 or 1.0)
    bottom, top = lo - pad, hi + pad

    def x_of(step: float) -> float:
        return LEFT + (step - 1) / max(count - 1, 1) * (PLOT_WIDTH - 1)

    def y_of(value: float) -> float:
        return TOP + (top - value) / (top - bottom) * (PLOT_HEIGHT - 1)

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)

    # Y labels at min, middle and max of the data (not the padded range) with light grid lines.
    for value in sorted({lo, (lo + hi) / 2, hi}):
        y = y_of(value)
        draw.line([(LEFT, y), (LEFT + PLOT_WIDTH - 1, y)], fill=GRID_COLOUR)
        draw.text((LEFT - 6, y), f"{value:.4g}", fill="black", font=font, anchor="rm")

    # X labels: first, last, and round ticks in between that do not crowd them.
    for step in _x_ticks(count):
        x = x_of(step)
        draw.line([(x, TOP + PLOT_HEIGHT), (x, TOP + PLOT_HEIGHT + 4)], fill=AXIS_COLOUR)
        draw.text((x, TOP + PLOT_HEIGHT + 6), str(step), fill="black", font=font, anchor="mt")
    draw.text((LEFT + PLOT_WIDTH, TOP + PLOT_HEIGHT + 22), "step", fill=AXIS_COLOUR, font=font, anchor="rt")

    # Marks go under the curves so the loss stays readable where they cross.
    for mark in sorted({int(m) for m in marks if 1 <= m <= count}):
        x = round(x_of(mark))
        for y in range(TOP + 14, TOP + PLOT_HEIGHT, 8):
            draw.line([(x, y), (x, min(y + 4, TOP + PLOT_HEIGHT - 1))], fill=MARK_COLOUR)
        draw.text((x, TOP + 2), str(mark), fill=MARK_COLOUR, font=font, anchor="mt")

    window = max(1, round(count / 20))
    _polyline(draw, steps[finite], values[finite], x_of, y_of, RAW_COLOUR, 1)
    _polyline(draw, steps[finite], _moving_average(values[finite], window), x_of, y_of, AVERAGE_COLOUR, 2)

    draw.rectangle([LEFT - 1, TOP - 1, LEFT + PLOT_WIDTH, TOP + PLOT_HEIGHT], outline=AXIS_COLOUR)
    subtitle = f"loss (dark: moving average over {window} step{'s' if window > 1 else ''})"
    shown, title_font = drawable(title)  # the title holds the prompt: any script
    draw.text((LEFT, 4), shown, fill="black", font=title_font)
    draw.text((LEFT, 18), subtitle, fill=AXIS_COLOUR, font=font)
    return image


def loss_png(losses: Sequence[float], title: str) -> bytes:
    """`loss_curve` as PNG bytes, as entries store it beside their tensors."""
    buffer = BytesIO()
    loss_curve(losses, title=title).save(buffer, format="PNG")
    return buffer.getvalue()


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """A centred mean over `window` values; the edges average what exists, so the curve spans every step."""
    if values.size == 0:
        return values
    kernel = np.ones(min(window, values.size))  # "same" mode returns the longer input's length
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def _x_ticks(count: int) -> list[int]:
    """Step 1, the last step, and multiples of a 1/2/5 x 10^k stride giving at most six ticks after step 1."""
    raw = max(count / 7, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    stride = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    gap = max(count * 40 / PLOT_WIDTH, 1)  # about 40 px between labels, in steps
    inner = [s for s in range(stride, count, stride) if s - 1 >= gap and count - s >= gap]
    return sorted({1, *inner, count})


def _polyline(
    draw: ImageDraw.ImageDraw,
    steps: np.ndarray,
    values: np.ndarray,
    x_of: Callable[[float], float],
    y_of: Callable[[float], float],
    colour: tuple[int, int, int],
    width: int,
) -> None:
    """A line through the points; a single point becomes a dot, since a one-point line draws nothing."""
    points = [(x_of(float(s)), y_of(float(v))) for s, v in zip(steps, values, strict=True)]
    if len(points) == 1:
        (x, y), r = points[0], width + 1
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif points:
        draw.line(points, fill=colour, width=width, joint="curve")
