"""Windowed video UNet calls: the frame spans, the blending, and kwargs slicing."""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING, Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from tavcli.method.windows import WindowedUNet, Windows

if TYPE_CHECKING:
    from tavcli.method.video_unet import VideoUNet


def _inputs(unet: Any, clips: int, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(clips, 4, frames, 8, 8, generator=generator)
    text = torch.randn(clips, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, text


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_spans_cover_every_frame_with_frame_zero_in_each_window(size: int) -> None:
    for overlap in range(size - 1):
        windows = Windows(size, overlap)
        for frames in range(1, 30):
            spans = windows.spans(frames)
            assert sorted({f for span in spans for f in span}) == list(range(frames))
            assert all(len(span) == min(size, frames) for span in spans)
            assert spans[0] == list(range(min(size, frames)))
            assert spans[-1][-1] == frames - 1
            for span in spans[1:]:
                assert span[0] == 0 and span[1:] == list(range(span[1], span[1] + size - 1))
            for previous, current in pairwise(spans):
                assert len(set(previous[1:]) & set(current[1:])) >= overlap
                assert current[1] > previous[1]


def test_spans_example() -> None:
    assert Windows(4, 1).spans(9) == [[0, 1, 2, 3], [0, 3, 4, 5], [0, 5, 6, 7], [0, 6, 7, 8]]


@pytest.mark.parametrize(("size", "overlap"), [(1, 0), (0, 0), (4, 3), (4, -1), (2, 1)])
def test_windows_reject_out_of_range_settings(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="window"):
        Windows(size, overlap)


def test_short_clip_is_one_plain_call(oracle_video_unet: VideoUNet) -> None:
    sample, text = _inputs(oracle_video_unet, 1, 4)
    with torch.no_grad():
        plain = oracle_video_unet(sample, 500, text).sample
        windowed = WindowedUNet(oracle_video_unet, Windows(4, 1))(sample, 500, text).sample
    assert torch.equal(windowed, plain)


def test_long_clip_blends_windows_of_the_real_unet(oracle_video_unet: VideoUNet) -> None:
    sample, text = _inputs(oracle_video_unet, 1, 9)
    windows = Windows(4, 1)
    spans = windows.spans(9)  # [0,1,2,3] [0,3,4,5] [0,5,6,7] [0,6,7,8]
    with torch.no_grad():
        out = WindowedUNet(oracle_video_unet, windows)(sample, 500, text).sample
        first = oracle_video_unet(sample[:, :, spans[0]], 500, text).sample
        second = oracle_video_unet(sample[:, :, spans[1]], 500, text).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :3], first[:, :, :3], atol=1e-6, rtol=0)  # frames 0, 1, 2
    torch.testing.assert_close(out[:, :, 4], second[:, :, 2], atol=1e-6, rtol=0)  # frame 4: second window only
    assert not torch.allclose(out[:, :, 3], first[:, :, 3]) and not torch.allclose(out[:, :, 3], second[:, :, 1])


def test_batch_of_clips_equals_each_clip_alone(oracle_video_unet: VideoUNet) -> None:
    sample, text = _inputs(oracle_video_unet, 2, 5)
    timestep = torch.tensor([100, 700])
    windowed = WindowedUNet(oracle_video_unet, Windows(3, 1))
    with torch.no_grad():
        both = windowed(sample, timestep, text).sample
        alone = [windowed(sample[i : i + 1], timestep[i], text[i : i + 1]).sample for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)


class _Recorder:
    """A fake UNet that records its kwargs and returns a constant per call (the call's index)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor, **kwargs: Any) -> UNet2DConditionOutput:
        self.calls.append({"sample": sample, "timestep": timestep, **kwargs})
        return UNet2DConditionOutput(sample=torch.full_like(sample, float(len(self.calls) - 1)))


def test_per_frame_kwargs_are_sliced_clip_major_and_others_pass_through() -> None:
    clips, frames = 2, 7
    windows = Windows(3, 0)  # [0,1,2] [0,3,4] [0,5,6]
    rows = torch.arange(clips * frames, dtype=torch.float32)  # row = clip * frames + frame
    residual = rows.view(-1, 1, 1, 1).expand(-1, 2, 4, 4)
    recorder = _Recorder()
    marker = {"scale": 0.5}
    WindowedUNet(recorder, windows)(
        torch.zeros(clips, 4, frames, 8, 8),
        torch.tensor([3, 4]),
        torch.zeros(clips, 77, 8),
        mid_block_additional_residual=residual,
        down_block_additional_residuals=[residual, residual[:, :1]],
        cross_attention_kwargs=marker,
        other=torch.zeros(5),
    )
    spans = windows.spans(frames)
    assert len(recorder.calls) == len(spans)
    for call, span in zip(recorder.calls, spans, strict=True):
        expected = torch.tensor([clip * frames + f for clip in range(clips) for f in span], dtype=torch.float32)
        assert torch.equal(call["mid_block_additional_residual"][:, 0, 0, 0], expected)
        down = call["down_block_additional_residuals"]
        assert isinstance(down, list) and [d.shape[1] for d in down] == [2, 1]
        assert all(torch.equal(d[:, 0, 0, 0], expected) for d in down)
        assert call["cross_attention_kwargs"] is marker and call["other"].shape == (5,)
        assert torch.equal(call["timestep"], torch.tensor([3, 4])) and call["sample"].shape[2] == 3


def test_overlapped_frames_blend_between_windows_and_others_are_exact() -> None:
    windows = Windows(5, 2)
    frames = 10
    spans = windows.spans(frames)  # [0..4] [0,3,4,5,6] [0,5,6,7,8] [0,6,7,8,9]
    out = WindowedUNet(_Recorder(), windows)(torch.zeros(1, 1, frames, 2, 2), 1, torch.zeros(1, 77, 8)).sample
    values = out[0, 0, :, 0, 0]
    assert values[0] == 0  # frame 0 from the first window only
    for frame in range(1, frames):
        owners = [k for k, span in enumerate(spans) if frame in span[1:]]
        if len(owners) == 1:
            assert values[frame] == owners[0]
        else:
            assert min(owners) < values[frame] < max(owners)
    assert values[1:].diff().ge(0).all()  # the blend moves monotonically from window to window
