"""SDXL through tavcli equals diffusers' `StableDiffusionXLPipeline` (narrow, random weights, float32): prompts
are encoded as its `encode_prompt` does (both encoders' penultimate states, the second's pooled embedding, zeros
for the empty prompt), and a one-frame edit with the temporal layers at their zero initialisation is the
pipeline's DDIM sampling from the same latents, prompt, negative prompt, guidance and size numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from tavcli.method.sampling import Guidance, ddim_sample
from tavcli.models.architectures import build_model
from tavcli.models.conditioning import SizeConditioning, pack_pooled, split_text
from tavcli.models.loading import encode_prompts, load_components
from tavcli.models.source import Components, ModelSource

from .conftest import without_temporal_output


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", narrow=True)


@pytest.fixture(scope="module")
def components(sdxl: Path) -> Components:
    return load_components(ModelSource("sdxl", sdxl, "test"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pipe(sdxl: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(
    components: Components, pipe: StableDiffusionXLPipeline
) -> None:
    sequence, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a panda is skiing", device="cpu", negative_prompt="blurry"
    )
    # One at a time, as the pipeline encodes them (a batch may take another matmul path: 1e-7 apart).
    packed = torch.cat([encode_prompts(components, [prompt]) for prompt in ("a panda is skiing", "blurry", "")])
    assert packed.shape == (3, 78, 96)  # 77 tokens of 32 + 64 wide, then the pooled row
    config = components.unet.config
    for row, (want, want_pooled) in enumerate([(sequence, pooled), (negative, negative_pooled)]):
        text, added = split_text(packed[row : row + 1], config, torch.zeros(6))
        assert added is not None
        torch.testing.assert_close(text, want, rtol=0, atol=0)
        torch.testing.assert_close(added["text_embeds"], want_pooled, rtol=0, atol=0)
        assert not packed[row, -1, want_pooled.shape[-1] :].any()  # the row's padding
    # force_zeros_for_empty_prompt: the pipeline's default negative (none given) is zeros, both parts.
    assert not packed[2].any()


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["zeros", "negative-prompt"])
def test_a_one_frame_edit_is_the_sdxl_pipelines_ddim_sampling(
    sdxl: Path, components: Components, pipe: StableDiffusionXLPipeline, negative: str | None
) -> None:
    sizes = SizeConditioning(original=(480, 640), crop_top_left=(0, 21), target=(64, 64))
    noise = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    guidance = Guidance(7.5, guidance_rescale=0.3)
    expected = pipe(
        "a panda is skiing",
        negative_prompt=negative,
        height=64,
        width=64,
        latents=noise[:, :, 0],
        num_inference_steps=4,
        guidance_scale=guidance.guidance,
        guidance_rescale=guidance.guidance_rescale,
        original_size=sizes.original,
        crops_coords_top_left=sizes.crop_top_left,
        target_size=sizes.target,
        output_type="latent",
    ).images
    video = without_temporal_output(components.unet)
    video.time_ids = sizes.time_ids()
    prompt, unconditional = (encode_prompts(components, [text]) for text in ("a panda is skiing", negative or ""))
    edited = ddim_sample(video, components.scheduler, noise, prompt, unconditional, 4, guidance)
    torch.testing.assert_close(edited[:, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_the_pooled_row_is_taken_off_before_attention_sees_the_text(components: Components) -> None:
    seen: list[int] = []
    video = without_temporal_output(components.unet)
    video.time_ids = torch.zeros(6)
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        for name, module in video.named_modules()
        if name.endswith("attn2")
    ]
    text = pack_pooled(torch.zeros(1, 77, 96), torch.zeros(1, 64))
    with torch.no_grad():
        video(torch.zeros(1, 4, 2, 8, 8), 10, text)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {77}
