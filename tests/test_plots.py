"""The loss-curve picture: size, the curves' pixels, step marks, and the edge cases a short tune produces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tavcli.media.plots import AVERAGE_COLOUR, LEFT, PLOT_WIDTH, SIZE, TOP, loss_curve


def _rows_of(image: Image.Image, column: int, colour: tuple[int, int, int]) -> np.ndarray:
    """Rows where `column` holds exactly `colour`."""
    pixels = np.asarray(image)[:, column]
    return np.flatnonzero((pixels == colour).all(axis=-1))


def _count(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.asarray(image) == colour).all(axis=-1).sum())


def test_rgb_image_of_fixed_size_with_the_average_line() -> None:
    losses = 0.1 + 0.5 * np.exp(-np.arange(300) / 60) + np.random.default_rng(0).normal(0, 0.02, 300)
    image = loss_curve(losses.tolist(), title="'a man is skiing', 300 steps")
    assert image.mode == "RGB"
    assert image.size == SIZE
    assert _count(image, AVERAGE_COLOUR) > 500  # a 2-pixel line across 800 columns


def test_decreasing_losses_start_high_and_end_low() -> None:
    image = loss_curve(np.linspace(1.0, 0.2, 200).tolist())
    first = _rows_of(image, LEFT, AVERAGE_COLOUR)
    last = _rows_of(image, LEFT + PLOT_WIDTH - 1, AVERAGE_COLOUR)
    assert first.size and last.size
    assert first.mean() < last.mean() - 300  # smaller y is higher up; the curve spans most of the 400-pixel plot
    assert first.min() >= TOP


def test_marks_draw_at_their_steps_and_out_of_range_ones_are_ignored() -> None:
    losses = np.linspace(1.0, 0.2, 200).tolist()
    plain = np.asarray(loss_curve(losses))
    marked = np.asarray(loss_curve(losses, marks=(50,)))
    columns = np.flatnonzero((plain != marked).any(axis=-1).any(axis=0))
    expected = LEFT + (50 - 1) / (200 - 1) * (PLOT_WIDTH - 1)
    assert columns.size
    assert np.abs(columns - expected).max() <= 15  # the dashed line and its centred label
    outside = np.asarray(loss_curve(losses, marks=(0, -3, 201)))
    assert np.array_equal(outside, plain)


@pytest.mark.parametrize("losses", [[0.42], [0.3] * 10, [0.0] * 3])
def test_one_loss_and_constant_losses(losses: list[float]) -> None:
    image = loss_curve(losses, marks=(1, 5))
    assert image.size == SIZE
    assert _count(image, AVERAGE_COLOUR) > 0


def test_non_finite_losses_are_skipped() -> None:
    image = loss_curve([1.0, float("nan"), 0.5, float("inf"), 0.25])
    assert _count(image, AVERAGE_COLOUR) > 0
    assert loss_curve([float("nan")]).size == SIZE  # nothing to draw, but still a picture


def test_empty_losses_raise() -> None:
    with pytest.raises(ValueError, match="no losses to plot"):
        loss_curve([])


def test_saves_and_reopens_as_png(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    loss_curve([0.5, 0.4, 0.3], marks=(2,), title="three steps").save(path)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG"
        assert reopened.size == SIZE
        assert _count(reopened.convert("RGB"), AVERAGE_COLOUR) > 0
