"""The real Stable Diffusion architectures (tavcli.models.architectures) through the whole product.

SD 1.5, SD 2.1 base and SD 2.1 768-v differ in what breaks code written against one tiny model:
per-block head counts, convolutional or linear projections, attention upcasting, 1024-wide text,
v-prediction. Narrow random-weight models keep every one of those choices and run through the
command line; the full-width UNets run one tune and the one-frame check.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from tavcli.method import training
from tavcli.method.training import TrainingRun, train_delta
from tavcli.method.video_unet import inflate_unet, trainable_parameters
from tavcli.models.architectures import ARCHITECTURES, build_model, configs
from tavcli.models.loading import load_components
from tavcli.models.resolving import resolve_model
from tavcli.runtime import resolve_runtime

from .conftest import CLIP, RunTav, without_temporal_output
from .ldm_format import ldm_checkpoint
from .reference_format import write_reference_output

NAMES = [name for name in ARCHITECTURES if name != "sdxl"]  # the SD 1.x/2.x ones; SDXL's: tests/test_sdxl.py
CPU = torch.device("cpu")
# 3 frames: frame 2 attends to frames 0 and 1, the sparse-causal path that 1 and 2 frames never take.
SMALL = ["--frames", "3", "--width", "64", "--height", "64", "--steps", "2"]
EDIT = ["--steps", "2"]
PROMPT = "a man is skiing"


@pytest.fixture(scope="session")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The narrow model folder of an architecture, built on first use and kept for the session."""
    root = tmp_path_factory.mktemp("architectures")
    return lambda name: build_model(name, root / name, narrow=True)


@pytest.fixture(scope="session")
def narrow_unet(narrow: Callable[[str], Path]) -> Callable[[str], UNet2DConditionModel]:
    """A narrow model's 2D UNet, loaded once through tavcli's loading code."""
    return functools.cache(lambda name: load_components(resolve_model(str(narrow(name))), CPU, torch.float32).unet)


@pytest.fixture(scope="module")
def full_unet() -> Iterator[Callable[[str], UNet2DConditionModel]]:
    """A full-size 2D UNet with random weights (3.4 GB): built once, the latest one kept until the module ends."""

    @functools.lru_cache(maxsize=1)
    def build(name: str) -> UNet2DConditionModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return UNet2DConditionModel(**configs(name)["unet"]).eval().requires_grad_(False)

    yield build
    build.cache_clear()


def _records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _declared_heads(name: str) -> dict[str, int]:
    """Heads of each attention block by module prefix, from the declaration (diffusers' SD 2 quirk:
    `attention_head_dim` holds head counts, reversed for the up blocks, the last block's for the middle)."""
    unet = ARCHITECTURES[name]["unet"]
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(unet["block_out_channels"])
    prefixes = {f"down_blocks.{i}.": count for i, count in enumerate(heads)}
    prefixes |= {f"up_blocks.{i}.": count for i, count in enumerate(reversed(heads))}
    return prefixes | {"mid_block.": heads[-1]}


@pytest.mark.parametrize("name", NAMES)
def test_narrow_models_keep_every_structural_choice(
    name: str, narrow_unet: Callable[[str], UNet2DConditionModel]
) -> None:
    full, thin = configs(name), configs(name, narrow=True)
    widths = {"block_out_channels", "norm_num_groups"}  # what narrowing changes; everything else is kept
    changed = {"unet": widths, "vae": widths, "text_encoder": {"num_hidden_layers"}, "scheduler": set()}
    for part, narrowed in changed.items():
        assert {k: v for k, v in thin[part].items() if k not in narrowed} == {
            k: v for k, v in full[part].items() if k not in narrowed
        }, part
    assert full["text_encoder"]["hidden_size"] == full["unet"]["cross_attention_dim"]
    pairs = zip(thin["unet"]["block_out_channels"], full["unet"]["block_out_channels"], strict=True)
    assert all(narrow_width < full_width for narrow_width, full_width in pairs)
    assert thin["text_encoder"]["num_hidden_layers"] < full["text_encoder"]["num_hidden_layers"]

    video = inflate_unet(narrow_unet(name))
    heads, linear = _declared_heads(name), full["unet"]["use_linear_projection"]
    blocks = [(n, m) for n, m in video.named_modules() if n.endswith("transformer_blocks.0")]
    assert len(blocks) == 16  # SD's 6 down, 1 middle and 9 up transformer blocks
    for module_name, block in blocks:
        expected = next(count for prefix, count in heads.items() if module_name.startswith(prefix))
        assert block.attn1.heads == block.attn2.heads == block.attn_temp.heads == expected, module_name
        assert block.attn1.upcast_attention == full["unet"]["upcast_attention"]
    projections = [m.proj_in for n, m in video.named_modules() if n.endswith(".attentions.0")]
    assert projections and all(isinstance(p, torch.nn.Linear) == linear for p in projections)


def test_full_size_configs_have_the_published_parameter_counts() -> None:
    """Counted on the meta device (no memory): the numbers of the released SD 1.5 and 2.1 checkpoints."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    published = {"sd15": (859_520_964, 123_060_480), "sd21-base": (865_910_724, 340_387_840)}
    published["sd21-v"] = published["sd21-base"]
    for name, (unet_count, text_count) in published.items():
        parts = configs(name)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**parts["unet"])
            vae = AutoencoderKL(**parts["vae"])
            text = CLIPTextModel(CLIPTextConfig(**parts["text_encoder"]))
        counts = [sum(p.numel() for p in module.parameters()) for module in (unet, vae, text)]
        assert counts == [unet_count, 83_653_863, text_count], name


@pytest.mark.slow
def test_full_width_sd15_tune_trains_every_tensor(full_unet: Callable[[str], UNet2DConditionModel]) -> None:
    """The full SD 1.5 UNet, 3 frames of 8x8 latents, 2 steps with gradient checkpointing.

    Every trainable tensor must move by more than AdamW's weight decay alone would move it: the
    reference's checkpointing leaves the down blocks without gradients (docs/method.md, "Tuning").
    Defined before the one-frame test so the full SD 1.5 UNet is built once.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        video = inflate_unet(full_unet("sd15"))
    before = {name: param.detach().clone() for name, param in trainable_parameters(video).items()}
    assert len(before) == 112  # 16 blocks x (attn1.to_q, attn2.to_q, attn_temp q/k/v/out weight/out bias)
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 4, 3, 8, 8, generator=generator)
    embeds = torch.randn(1, 77, 768, generator=generator)
    run = TrainingRun(steps=2, gradient_checkpointing=True)
    scheduler = DDIMScheduler(**configs("sd15")["scheduler"])
    runtime = resolve_runtime("cpu", "fp32")
    state = train_delta(
        video, scheduler, mean, torch.full_like(mean, 0.1), 0.18215, embeds, run, runtime, lambda **_: None
    )
    assert len(state.losses) == 2 and all(math.isfinite(loss) for loss in state.losses)
    decay = 1 - run.learning_rate * 1e-2  # AdamW's decoupled weight decay per step
    for name, old in before.items():
        new = state.params[name]
        assert torch.isfinite(new).all(), name
        moved = (new - old * decay**2).abs().max().item()
        assert moved > run.learning_rate / 10, f"{name} got no gradient"


def _one_frame_outputs(image: UNet2DConditionModel, video_of: UNet2DConditionModel) -> tuple[torch.Tensor, ...]:
    """`image`'s output, and that of the inflated `video_of` with its temporal output zeroed, on 1-frame clips."""
    video = without_temporal_output(video_of)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 1, 16, 16, generator=generator)
    text = torch.randn(2, 77, image.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return image(sample[:, :, 0], 500, text).sample, video(sample, 500, text).sample[:, :, 0]


def _with_heads_doubled(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same weights read with twice the heads: what a misread `attention_head_dim` gives."""
    heads = unet.config.attention_head_dim
    doubled = [2 * h for h in heads] if isinstance(heads, (list, tuple)) else 2 * heads
    with torch.device("meta"):
        wrong = UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": doubled})
    wrong.load_state_dict(unet.state_dict(), assign=True)
    return wrong.eval()


@pytest.mark.parametrize(
    ("name", "width"),
    [*((name, "narrow") for name in NAMES), ("sd15", "full"), ("sd21-v", "full")],
    ids=lambda value: value,
)
def test_one_frame_clip_equals_the_image_model(
    name: str,
    width: str,
    narrow_unet: Callable[[str], UNet2DConditionModel],
    full_unet: Callable[[str], UNet2DConditionModel],
) -> None:
    """With one frame and no temporal output the video UNet is the 2D UNet: heads, head sizes,
    projections and norms must all be the image model's."""
    image = narrow_unet(name) if width == "narrow" else full_unet(name)
    expected, video = _one_frame_outputs(image, image)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=1e-5)
    # The check sees head counts: the same weights with twice the heads do not pass it.
    _, miscounted = _one_frame_outputs(image, _with_heads_doubled(image))
    assert (miscounted - expected).abs().max() > 1e-3


def _spy_on_training_targets(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record each training step's prediction type, target, noise and the velocity computed here."""
    seen: list[dict[str, Any]] = []
    original = training.training_target

    def spy(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        target = original(scheduler, latents, noise, timesteps)
        config = scheduler.config  # SD's scaled-linear betas, computed independently of diffusers
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, 1000, dtype=torch.float64) ** 2
        alpha = torch.cumprod(1 - betas, 0)[timesteps].float().view(-1, 1, 1, 1, 1)
        velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        seen.append({"type": config.prediction_type, "target": target, "noise": noise, "velocity": velocity})
        return target

    monkeypatch.setattr(training, "training_target", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_tune_invert_and_edit_through_the_command_line(
    name: str, narrow: Callable[[str], Path], tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, project = narrow(name), tmp_path / "p.tav"
    targets = _spy_on_training_targets(monkeypatch)
    code, out, err = run_tav("tune", CLIP, PROMPT, "--model", folder, *SMALL, "-p", project)
    assert code == 0, err
    latents, tune = _records(out)
    meta = json.loads((Path(tune["path"]) / "meta.json").read_text())
    assert meta["model"]["model"] == str(folder.resolve()) and meta["model"]["revision"].startswith("sha256-")
    assert len(meta["losses"]) == 2 and all(math.isfinite(loss) for loss in meta["losses"])
    assert load_file(Path(latents["path"]) / "tensors.safetensors")["mean"].shape == (1, 4, 3, 8, 8)
    prediction = ARCHITECTURES[name]["scheduler"]["prediction_type"]
    assert [step["type"] for step in targets] == [prediction, prediction]
    for step in targets:  # v-prediction regresses on the velocity, the others on the noise
        assert not torch.allclose(step["velocity"], step["noise"], atol=1e-3)
        wanted = step["velocity"] if prediction == "v_prediction" else step["noise"]
        torch.testing.assert_close(step["target"], wanted)

    code, out, err = run_tav("invert", "-p", project, "--steps", "2")
    assert code == 0, err
    [inversion] = _records(out)
    assert inversion["kind"] == "inversion"
    code, out, err = run_tav("edit", "a dog is skiing", "a cat is skiing", "-p", project, *EDIT)
    assert code == 0, err
    edits = _records(out)
    assert [(e["kind"], e["prompt"]) for e in edits] == [("edit", "a dog is skiing"), ("edit", "a cat is skiing")]
    for edit in edits:
        sidecar = json.loads(Path(edit["sidecar"]).read_text())
        assert Path(edit["path"]).stat().st_size > 0
        assert sidecar["model"] == meta["model"] and sidecar["inversion"]["key"] == inversion["key"]
        assert (sidecar["output"]["frames"], sidecar["output"]["width"]) == (3, 64)


def _reference_output(model: Path, path: Path) -> dict[str, torch.Tensor]:
    """What the reference training script saves after tuning `model`: the full video UNet and config.yaml.

    Returns the tensors an import must keep: the tuned projections and the temporal layers.
    """
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        weights = {k: v.detach().clone() for k, v in inflate_unet(unet).state_dict().items()}
        tuned = {
            k: v + 0.01 * torch.randn_like(v)
            for k, v in weights.items()
            if k.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".attn_temp." in k or ".norm_temp." in k
        }
    data = {"video_path": str(CLIP), "prompt": PROMPT, "n_sample_frames": 3, "width": 64, "height": 64}
    data |= {"sample_start_idx": 0, "sample_frame_rate": 2}
    run = {"pretrained_model_path": str(model), "train_data": data, "learning_rate": 3e-5, "max_train_steps": 300}
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    write_reference_output(path, weights | tuned, unet_config, yaml.safe_dump(run))
    return tuned


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_import_a_reference_tune_and_edit_from_it(
    name: str, narrow: Callable[[str], Path], tmp_path: Path, run_tav: RunTav
) -> None:
    tuned = _reference_output(narrow(name), tmp_path / "outputs" / "man-skiing")
    project = tmp_path / "imported.tav"
    code, out, err = run_tav("import", tmp_path / "outputs" / "man-skiing", "-p", project)
    assert code == 0, err
    tune = _records(out)[-1]
    delta = load_file(Path(tune["path"]) / "tensors.safetensors")
    assert delta.keys() == tuned.keys() and all(torch.equal(delta[k], tuned[k]) for k in tuned)
    meta = json.loads((Path(tune["path"]) / "meta.json").read_text())
    assert meta["spec"]["steps"] == 300 and meta["model"]["model"] == str(narrow(name).resolve())
    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, *EDIT)
    assert code == 0, err
    [edit] = [r for r in _records(out) if r["kind"] == "edit"]
    assert json.loads(Path(edit["sidecar"]).read_text())["tune"]["key"] == tune["key"]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_a_single_file_sd15_checkpoint_tunes_and_edits(
    narrow: Callable[[str], Path], tmp_path: Path, run_tav: RunTav
) -> None:
    """A DreamBooth-style checkpoint: SD 1.5's layout in one file, its UNet fine-tuned, read with SD 1.5's configs."""
    base = narrow("sd15")
    checkpoint = ldm_checkpoint(base)
    tuned = "model.diffusion_model.input_blocks.1.1.proj_in.weight"  # a 1x1 convolution in SD 1.x
    checkpoint[tuned] = checkpoint[tuned] + 0.01
    file = tmp_path / "dreambooth.safetensors"
    save_file(checkpoint, file)
    project = tmp_path / "p.tav"
    code, out, err = run_tav("tune", CLIP, PROMPT, "--model", file, "--model-config", base, *SMALL, "-p", project)
    assert code == 0, err
    meta = json.loads((Path(_records(out)[-1]["path"]) / "meta.json").read_text())
    assert meta["model"]["model"] == f"{file}|config={base}" and meta["model"]["revision"].startswith("file-")
    assert all(math.isfinite(loss) for loss in meta["losses"])

    converted = load_components(resolve_model(meta["model"]["model"]), CPU, torch.float32)
    original = load_components(resolve_model(str(base)), CPU, torch.float32)
    for part in ("vae", "text_encoder", "unet"):
        mine, theirs = _state(getattr(converted, part)), _state(getattr(original, part))
        assert mine.keys() == theirs.keys(), part
        differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert differ == ([] if part != "unet" else ["down_blocks.0.attentions.0.proj_in.weight"]), part
    proj_in = "down_blocks.0.attentions.0.proj_in.weight"
    torch.testing.assert_close(_state(converted.unet)[proj_in], _state(original.unet)[proj_in] + 0.01)

    code, out, err = run_tav("edit", "a dog is skiing", "a cat is skiing", "-p", project, *EDIT)
    assert code == 0, err
    edits = _records(out)
    assert [r["kind"] for r in edits] == ["edit", "edit"] and all(Path(r["path"]).stat().st_size for r in edits)
    assert "converting" not in err  # converted once, by the tune


def test_a_model_whose_part_was_not_saved_is_never_marked_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal caught inside a library's save left the cached tiny model without text-encoder weights, and every
    later run failed on it: the build refuses to write model_index.json (what marks it complete) then."""
    import json as json_module

    from transformers import CLIPTextModel

    from tavcli.errors import TavError
    from tavcli.models.architectures import TINY_CONFIGS, save_random_model
    from tavcli.models.tiny import PARTS

    parts = {part: json_module.loads((TINY_CONFIGS / f"{part}.json").read_text()) for part in PARTS}
    monkeypatch.setattr(CLIPTextModel, "save_pretrained", lambda self, folder, **kw: Path(folder).mkdir())
    with pytest.raises(TavError, match="left text_encoder without weights"):
        save_random_model(tmp_path / "model", parts)
    assert not (tmp_path / "model" / "model_index.json").exists()
