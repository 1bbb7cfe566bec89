"""SDXL base 1.0, declared beside SD 1.5 and 2.1 (narrow, random weights): diffusers' own pipeline loads it, the
inflated UNet at one frame is diffusers' SDXL UNet with its added inputs given per clip, prompts are encoded and a
one-frame edit is sampled exactly as `StableDiffusionXLPipeline` does, the trained set is the paper's rule on
SDXL's blocks, and UNets that need inputs tavcli never gives (inpainting, depth, the refiner) are refused in one
line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from tavcli.method.video_unet import inflate_unet, trainable_parameters
from tavcli.models.architectures import build_model, configs
from tavcli.models.conditioning import pack_pooled

from .conftest import CLIP, RunTav, load_benchmark, without_temporal_output


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", narrow=True)


@pytest.fixture(scope="module")
def sdxl_unet(sdxl: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(sdxl / "unet").eval()


def test_the_declared_sdxl_is_diffusers_own_and_keeps_every_structural_choice(sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    full = configs("sdxl")
    unet, vae, second = full["unet"], full["vae"], full["text_encoder_2"]
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == full["text_encoder"]["hidden_size"] + second["hidden_size"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + 1280
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    narrow = configs("sdxl", narrow=True)["unet"]
    kept = ("down_block_types", "up_block_types", "transformer_layers_per_block", "attention_head_dim")
    assert all(narrow[key] == unet[key] for key in kept)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)  # the real loading code, both encoders and tokenizers
    assert pipe.text_encoder_2.config.projection_dim == narrow["projection_class_embeddings_input_dim"] - 6 * 8
    assert pipe.config.force_zeros_for_empty_prompt


TIME_IDS = torch.tensor([256.0, 256.0, 0.0, 0.0, 256.0, 256.0])


def _added(batch: int, width: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {"text_embeds": torch.randn(batch, width, generator=generator), "time_ids": TIME_IDS.expand(batch, -1)}


def test_the_inflated_sdxl_unet_at_one_frame_is_diffusers_sdxl_unet(
    sdxl: Path, sdxl_unet: UNet2DConditionModel
) -> None:
    """Zero temporal output: every frame of a clip is the image model's output, SDXL's pooled text and size
    numbers given once per clip (the video UNet repeats them per frame)."""
    video = without_temporal_output(UNet2DConditionModel.from_pretrained(sdxl / "unet"))
    video.time_ids = TIME_IDS
    generator = torch.Generator().manual_seed(1)
    frame = torch.randn(2, 4, 1, 8, 8, generator=generator)
    text = torch.randn(2, 77, sdxl_unet.config.cross_attention_dim, generator=generator)
    added = _added(2, sdxl_unet.config.projection_class_embeddings_input_dim - 6 * 8)
    packed = pack_pooled(text, added["text_embeds"])
    with torch.no_grad():
        image = sdxl_unet(frame[:, :, 0], 500, text, added_cond_kwargs=added).sample
        one = video(frame, 500, packed).sample[:, :, 0]
        # Three copies of the frame: sparse-causal attention then attends to copies of itself.
        three = video(frame.expand(-1, -1, 3, -1, -1), 500, packed).sample
    assert torch.equal(one, image)
    for index in range(3):
        torch.testing.assert_close(three[:, :, index], image, atol=1e-5, rtol=0)


def test_the_trained_set_is_the_papers_rule_on_every_sdxl_transformer_block(
    sdxl_unet: UNet2DConditionModel,
) -> None:
    """Each of SDXL's 70 transformer blocks (1, 2 and 10 per attention) trains its attn1 and attn2 queries and its
    new temporal attention, and nothing else trains."""
    from diffusers.models.attention import BasicTransformerBlock

    with torch.random.fork_rng(devices=[]):
        video = inflate_unet(sdxl_unet)
    blocks = [name for name, module in video.named_modules() if isinstance(module, BasicTransformerBlock)]
    assert len(blocks) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down 1 and 2, mid, up 0 and 1: 70
    trained = set(trainable_parameters(video))
    temporal = {name for name in trained if ".attn_temp." in name or ".norm_temp." in name}
    queries = trained - temporal
    assert queries == {f"{block}.{attn}.to_q.weight" for block in blocks for attn in ("attn1", "attn2")}
    assert {name.split(".attn_temp.")[0].split(".norm_temp.")[0] for name in temporal} == set(blocks)


def _refused(run_tav: RunTav, model: Path, tmp_path: Path) -> str:
    project = tmp_path / "p.tav"
    code, out, err = run_tav("tune", CLIP, "a man is skiing", "--model", model, "-p", project, "--steps", "1")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert not list(project.glob("latents/*/meta.json"))  # refused before the clip was encoded
    return err


def test_an_sdxl_unet_without_the_second_text_encoder_is_refused_in_one_line(
    run_tav: RunTav, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import json
    import shutil

    model = build_model("sdxl", tmp_path_factory.mktemp("m") / "m", narrow=True)
    index = json.loads((model / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (model / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(model / "text_encoder_2")
    assert "without SDXL's second text encoder" in _refused(run_tav, model, tmp_path)


@pytest.mark.parametrize(
    ("channels", "what"), [(9, "an inpainting model"), (5, "a depth-to-image model")], ids=["inpainting", "depth"]
)
def test_a_unet_that_needs_inputs_tavcli_never_gives_is_refused_in_one_line(
    channels: int, what: str, run_tav: RunTav, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = build_model(
        "sd15", tmp_path_factory.mktemp("m") / "m", narrow=True, changes={"unet": {"in_channels": channels}}
    )
    assert f"is {what}" in _refused(run_tav, model, tmp_path)


def test_a_tune_of_sdxl_trains_the_papers_set_eight_times_sd15s() -> None:
    """Counted on the meta device from the declared configs (`benchmarks/trained_parameters.py`)."""
    counts = load_benchmark("trained_parameters").counts
    sd15, sdxl = counts("sd15", [4]), counts("sdxl", [4])
    assert 8 < sdxl["trained"] / sd15["trained"] < 9 and sdxl["of which temporal"] < sdxl["trained"]
    assert sdxl["--rank 4"] < sdxl["trained"] / 100


def test_the_sdxl_refiner_is_told_from_the_base_by_its_configs(tmp_path: Path) -> None:
    """The refiner's UNet is SDXL's too; its pipeline has no first text encoder and takes an aesthetic score."""
    import json

    from tavcli.errors import TavError
    from tavcli.models.families import require_supported

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, "addition_embed_type": "text_time"}))
    refiner = {"text_encoder": [None, None], "requires_aesthetics_score": True}
    (tmp_path / "model_index.json").write_text(json.dumps(refiner))
    with pytest.raises(TavError, match=r"^refiner is the SDXL refiner \(its UNet also takes an aesthetic score\)"):
        require_supported(tmp_path, "refiner")


def test_a_training_step_on_sdxl_moves_the_papers_set_and_nothing_else(sdxl: Path) -> None:
    """One AdamW step of `train_delta` on the narrow SDXL, its text packed with the pooled row and the clip's size
    numbers held by the UNet: every attention query of all 70 blocks and the temporal output projections move
    (those start at zero: the rest of each temporal attention only gets gradient once they are not), and no
    other weight, the frozen 2D UNet included, changes."""
    from tavcli.method.training import TrainingRun, train_delta
    from tavcli.runtime import Runtime

    unet = UNet2DConditionModel.from_pretrained(sdxl / "unet")
    frozen = {name: value.clone() for name, value in unet.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        video = inflate_unet(unet, seed=0, time_ids=TIME_IDS)
    before = {name: value.clone() for name, value in video.state_dict().items()}
    generator = torch.Generator().manual_seed(4)
    mean, std = torch.randn(1, 4, 2, 8, 8, generator=generator), torch.rand(1, 4, 2, 8, 8, generator=generator)
    text = pack_pooled(torch.randn(1, 77, 96, generator=generator), torch.randn(1, 64, generator=generator))
    run = TrainingRun(steps=1, learning_rate=1e-3)
    train_delta(
        video, DDIMScheduler(), mean, std, 0.13025, text, run, Runtime(torch.device("cpu"), "fp32"), lambda **_: None
    )
    moved = {name for name, value in video.state_dict().items() if not torch.equal(value, before[name])}
    trained = set(trainable_parameters(video))
    queries = {name for name in trained if name.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))}
    assert len(queries) == 140 and queries <= moved <= trained
    assert {name for name in moved if "attn_temp.to_out.0" in name} == {n for n in trained if "attn_temp.to_out.0" in n}
    assert all(torch.equal(value, frozen[name]) for name, value in unet.state_dict().items())
