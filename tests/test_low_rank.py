"""Low-rank tunes: peft LoRA adapters on exactly the layers Tune-A-Video tunes, merged, stored and re-created."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file, save_file
from torch import nn

from tavcli.errors import TavError
from tavcli.method.low_rank import (
    ADAPTER,
    add_low_rank_adapters,
    load_low_rank,
    low_rank_parameters,
    merge_low_rank,
    temporal_init_digest,
)
from tavcli.method.video_unet import SparseCausalAttnProcessor, VideoUNet, inflate_unet

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

TUNED = ("attn1.to_q", "attn2.to_q", "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0")


def _video(unet2d: nn.Module, seed: int = 0, rank: int | None = None) -> VideoUNet:
    torch.manual_seed(seed)  # the temporal layers' initial weights
    unet = inflate_unet(unet2d).eval()
    if rank is not None:
        add_low_rank_adapters(unet, rank)
    return unet


def _forward(unet: VideoUNet) -> torch.Tensor:
    sample = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    return unet(sample, 500, text).sample


def _randomize(params: dict[str, nn.Parameter], seed: int, only_b: bool = False) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in params.items():
            if ".lora_B." in name or not only_b:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_adapters_wrap_exactly_the_tuned_linear_layers(oracle_unet2d: UNet2DConditionModel) -> None:
    from peft.tuners.lora import LoraLayer

    flags = [param.requires_grad for param in oracle_unet2d.parameters()]
    unet = _video(oracle_unet2d, rank=3)
    blocks = [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]
    adapted = {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}
    assert len(blocks) == 16
    assert set(adapted) == {f"{block}.{layer}" for block in blocks for layer in TUNED}
    assert all(isinstance(module.get_base_layer(), nn.Linear) for module in adapted.values())

    params = low_rank_parameters(unet)
    assert len(params) == 2 * len(adapted) == 2 * 6 * 16
    for name, module in adapted.items():
        base = module.get_base_layer()
        lora_a, lora_b = params[f"{name}.lora_A.{ADAPTER}.weight"], params[f"{name}.lora_B.{ADAPTER}.weight"]
        assert lora_a.shape == (3, base.in_features) and lora_b.shape == (base.out_features, 3)
    assert all(param.requires_grad for param in params.values())
    assert not any(p.requires_grad for n, p in unet.named_parameters() if n not in params)  # peft froze the rest
    assert [p.requires_grad for p in oracle_unet2d.parameters()] == flags  # the 2D model's own flags stay
    # The custom sparse-causal processor is kept and calls the wrapped projections.
    processors = unet.attn_processors
    assert all(isinstance(p, SparseCausalAttnProcessor) for n, p in processors.items() if n.endswith("attn1.processor"))


def test_fresh_adapters_leave_the_output_bit_identical(oracle_unet2d: UNet2DConditionModel) -> None:
    with torch.no_grad():
        plain = _forward(_video(oracle_unet2d))
        adapted = _forward(_video(oracle_unet2d, rank=4))
    assert torch.equal(plain, adapted)


def test_backward_reaches_every_adapter_tensor_and_no_base_weight(oracle_unet2d: UNet2DConditionModel) -> None:
    unet = _video(oracle_unet2d, rank=4)
    params = low_rank_parameters(unet)
    _randomize(params, seed=2, only_b=True)  # B = 0 would give lora_A no gradient
    unet.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    unet.train()
    _forward(unet).square().mean().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in params.values())
    assert all(param.grad is None for name, param in unet.named_parameters() if name not in params)
    assert all(param.grad is None for param in oracle_unet2d.parameters())


def test_merge_keeps_the_output_and_leaves_the_image_model_untouched(oracle_unet2d: UNet2DConditionModel) -> None:
    before = {name: tensor.clone() for name, tensor in oracle_unet2d.state_dict().items()}
    unet = _video(oracle_unet2d, rank=4)
    _randomize(low_rank_parameters(unet), seed=3)
    with torch.no_grad():
        unmerged = _forward(unet)
        merge_low_rank(unet)
        merged = _forward(unet)
    assert not torch.equal(unmerged, _forward(_video(oracle_unet2d)).detach())  # the adapters did something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert low_rank_parameters(unet) == {}
    assert set(unet.state_dict()) == set(_video(oracle_unet2d).state_dict())  # no lora_ or base_layer names left
    after = oracle_unet2d.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_stored_adapters_round_trip_onto_a_recreated_model(oracle_unet2d: UNet2DConditionModel, tmp_path: Path) -> None:
    trained = _video(oracle_unet2d, seed=5, rank=4)
    _randomize(low_rank_parameters(trained), seed=4)
    save_file({name: p.detach().contiguous() for name, p in low_rank_parameters(trained).items()}, tmp_path / "t")
    stored = load_file(tmp_path / "t")
    assert all(name.endswith((f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight")) for name in stored)

    recreated = _video(oracle_unet2d, seed=5, rank=4)
    load_low_rank(recreated, stored)
    with torch.no_grad():
        assert torch.equal(_forward(recreated), _forward(trained))
    # Plain load_state_dict works too: the stored names are the model's own.
    again = _video(oracle_unet2d, seed=5, rank=4)
    result = again.load_state_dict(stored, strict=False)
    assert result.unexpected_keys == [] and not set(stored) & set(result.missing_keys)

    with pytest.raises(ValueError, match="1 unexpected"):
        load_low_rank(recreated, {**stored, "down_blocks.0.attn1.to_k.lora_A.tav.weight": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="1 missing"):
        load_low_rank(recreated, dict(list(stored.items())[1:]))
    with pytest.raises(ValueError, match="differ"):
        load_low_rank(_video(oracle_unet2d, seed=5, rank=2), stored)


def test_temporal_init_digest_follows_the_seed_and_ignores_adapters(oracle_unet2d: UNet2DConditionModel) -> None:
    digest = temporal_init_digest(_video(oracle_unet2d, seed=0))
    assert len(digest) == 16
    assert temporal_init_digest(_video(oracle_unet2d, seed=0)) == digest
    assert temporal_init_digest(_video(oracle_unet2d, seed=1)) != digest

    unet = _video(oracle_unet2d, seed=0, rank=4)
    _randomize(low_rank_parameters(unet), seed=6)  # trained adapters leave the base tensors alone
    assert temporal_init_digest(unet) == digest
    merge_low_rank(unet)  # merging changes the temporal base weights
    assert temporal_init_digest(unet) != digest

    plain = _video(oracle_unet2d, seed=0)
    with torch.no_grad():
        plain.get_parameter("mid_block.attentions.0.transformer_blocks.0.norm_temp.weight").add_(1.0)
    assert temporal_init_digest(plain) != digest  # norm_temp counts too


def test_missing_peft_says_what_to_install(
    oracle_unet2d: UNet2DConditionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(TavError, match="needs peft") as error:
        _video(oracle_unet2d, rank=4)
    assert 'pip install "tavcli[lora]"' in str(error.value)
