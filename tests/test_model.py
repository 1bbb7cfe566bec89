"""The inflated video UNet against the reference implementation's tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from tavcli.method.video_unet import (
    SparseCausalAttnProcessor,
    VideoUNet,
    inflate_unet,
    sparse_causal_context,
    trainable_parameters,
)

from .conftest import ORACLE, TINY_SD, without_temporal_output


def test_reproduces_reference_forward_pass(oracle_video_unet: VideoUNet) -> None:
    case = load_file(ORACLE / "unet3d_caseA.safetensors")
    with torch.no_grad():
        out = oracle_video_unet(case["A.sample"], case["A.timestep"], case["A.encoder_hidden_states"]).sample
    assert out.shape == (1, 4, 5, 16, 16)
    assert (out - case["A.expected"]).abs().max().item() <= 1e-5


def test_reference_temporal_weights_load_without_unexpected_keys(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    temporal = load_file(ORACLE / "unet3d_temporal.safetensors")
    result = unet.load_state_dict(temporal, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(oracle_unet2d.state_dict())  # every temporal key was loaded
    assert len(temporal) == 112


def test_inflation_shares_frozen_weights_and_copies_tuned_ones(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = inflate_unet(oracle_unet2d)
    conv = "down_blocks.0.resnets.0.conv1.weight"
    query = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert unet.state_dict()[conv].data_ptr() == oracle_unet2d.state_dict()[conv].data_ptr()
    before = oracle_unet2d.state_dict()[query].clone()
    with torch.no_grad():
        unet.get_parameter(query).add_(1.0)
    assert torch.equal(oracle_unet2d.state_dict()[query], before)


def test_one_frame_clip_equals_image_model_when_temporal_path_is_zero(oracle_unet2d: UNet2DConditionModel) -> None:
    """With one frame, sparse-causal attention is self-attention and joint GroupNorm is per-frame."""
    unet = without_temporal_output(oracle_unet2d)
    sample = torch.randn(2, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = unet(sample, 500, text).sample
        image = oracle_unet2d(sample[:, :, 0], 500, text).sample
    torch.testing.assert_close(video[:, :, 0], image, atol=1e-5, rtol=0)


def test_frame_norm_choice_changes_the_numbers(oracle_unet2d: UNet2DConditionModel) -> None:
    sample = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    joint = inflate_unet(oracle_unet2d, frame_norm="joint").eval()
    torch.manual_seed(0)
    per_frame = inflate_unet(oracle_unet2d, frame_norm="frame").eval()
    with torch.no_grad():
        assert not torch.allclose(joint(sample, 10, text).sample, per_frame(sample, 10, text).sample)


def test_sparse_causal_context_takes_first_and_previous_frame() -> None:
    frames, tokens = 4, 3
    x = torch.arange(2 * frames, dtype=torch.float32).repeat_interleave(tokens).reshape(2 * frames, tokens, 1)
    context = sparse_causal_context(x, frames)[..., 0]
    assert context.shape == (2 * frames, 2 * tokens)
    for clip in range(2):
        for frame in range(frames):
            row = context[clip * frames + frame]
            first, previous = clip * frames, clip * frames + max(frame - 1, 0)
            assert row[:tokens].eq(first).all() and row[tokens:].eq(previous).all()


def test_trainable_parameters_are_the_query_projections_and_temporal_attention(oracle_video_unet: VideoUNet) -> None:
    names = list(trainable_parameters(oracle_video_unet))
    assert len(names) == 112  # 16 blocks x (attn1.to_q, attn2.to_q, attn_temp q/k/v/out.weight/out.bias)
    assert all(n.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".attn_temp." in n for n in names)
    assert not any("norm_temp" in n or "to_k" in n and "attn_temp" not in n for n in names)


@pytest.mark.parametrize(
    "feature, value",
    [("residual_connection", True), ("rescale_output_factor", 2.0), ("norm_q", torch.nn.LayerNorm(16))],
)
def test_inflation_refuses_self_attention_features_sparse_causal_attention_would_drop(
    feature: str, value: object
) -> None:
    unet = UNet2DConditionModel.from_pretrained(TINY_SD / "unet")
    setattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, feature, value)
    with pytest.raises(ValueError, match=f"does not support {feature}"):
        inflate_unet(unet)


def test_sparse_causal_attention_refuses_a_mask(oracle_video_unet: VideoUNet) -> None:
    block = oracle_video_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1.processor, SparseCausalAttnProcessor)
    hidden = torch.randn(2, 4, block.attn1.query_dim)
    with pytest.raises(ValueError, match="attention mask"):
        block.attn1.processor(block.attn1, hidden, attention_mask=torch.zeros(2, 4, 4))
