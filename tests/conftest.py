"""Shared fixtures: the reference's tiny model and tensors (tests/data/oracle), and an isolated cache."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from tavcli.method.video_unet import VideoUNet

DATA = Path(__file__).parent / "data"
ORACLE = DATA / "oracle"
TINY_SD = ORACLE / "tiny-sd"
CLIP = Path(__file__).parent.parent / "tavcli" / "data" / "man-skiing.mp4"  # 48 frames, 256x256, 29.97 fps
TINY_TOKENIZER = Path(__file__).parent.parent / "tavcli" / "tiny" / "tokenizer"


class RunTav(Protocol):
    """What the `run_tav` fixture gives: run `tav ARGS...` in-process; (exit code, stdout, stderr)."""

    def __call__(self, *args: str | Path) -> tuple[int, str, str]: ...


def tav_commands() -> MutableMapping[str, Any]:
    """The commands of `tav` by name, as typer builds them (typer bundles its own click)."""
    import typer

    from tavcli.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group.commands


def reproduce_in(run_tav: RunTav, sidecar: dict[str, Any], project: Path) -> list[dict[str, Any]]:
    """Run a sidecar's `reproduce` commands with `project` as their project; the last command's records."""
    import json
    import shlex

    out = ""
    for command in sidecar["reproduce"]:
        args = shlex.split(command)[1:]
        args[args.index("--project") + 1] = str(project)
        code, out, err = run_tav(*args)
        assert code == 0, (command, err)
    return [json.loads(line) for line in out.splitlines()]


def one_job(folder: Path, project: Path, edits: list[str], **tables: str) -> Path:
    """A batch file of one job: the bundled clip tuned as `a man is skiing` on the tiny model at 2 frames of
    32x32, with `tables` (e.g. `edit="{ steps = 2 }"`) written as the job's inline tables."""
    import json

    job = f"[[job]]\nclip = {json.dumps(str(CLIP))}\nprompt = 'a man is skiing'\nproject = {json.dumps(str(project))}\n"
    job += f"model = 'tiny'\nframes = 2\nwidth = 32\nheight = 32\nsteps = 10\nedits = {json.dumps(edits)}\n"
    job += "".join(f"{name} = {table}\n" for name, table in tables.items())
    (folder / "jobs.toml").write_text(job)
    return folder / "jobs.toml"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tav-cache")


@pytest.fixture(autouse=True)
def isolated_cache(
    cache_root: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """No test touches the real user cache or config, nor writes a project beside the bundled clip (into the
    package); the built tiny model is shared by the session."""
    monkeypatch.setenv("TAV_CACHE_DIR", str(cache_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    for name in ("TAV_MODEL", "TAV_DEVICE", "TAV_PRECISION", "TAV_PROJECT", "TAV_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    beside_clip = CLIP.with_suffix(".tav")
    there_before = beside_clip.exists()
    yield
    assert there_before or not beside_clip.exists(), f"the test made a project in the package: {beside_clip}"


def gif_frame_count(image: Any) -> int:
    """The frames of an animated picture (Pillow types `n_frames` only on some of its image classes)."""
    from PIL import ImageSequence

    return sum(1 for _ in ImageSequence.Iterator(image))


def tav_ok(*args: object) -> None:
    """Run `tav ARGS...` in-process (for module fixtures, which cannot use `run_tav`) and require success."""
    from tavcli.cli import main

    sys.argv = ["tav", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, args


def tav_in_fresh_python(argv: list[str], cwd: Path) -> tuple[bool, object, str]:
    """Run `tav ARGV...` in a new Python: (whether torch got imported, the exit status, stderr)."""
    import subprocess

    code = (
        "import sys\n"
        f"sys.argv = ['tav', *{argv!r}]\n"
        "from tavcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit_:\n    status = exit_.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', status)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60)
    torch_loaded, status = result.stdout.split()[-2:]
    return torch_loaded == "TORCH", status, result.stderr


def edit_record(run_tav: RunTav, project: Path, *extra: str | Path) -> dict:
    """`tav edit "a dog is skiing" --steps 2 EXTRA...` on `project`: its first JSON record."""
    import json

    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2", *extra)
    assert code == 0, err
    return json.loads(out.splitlines()[0])


@pytest.fixture(scope="session")
def oracle_unet2d() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(TINY_SD / "unet")


@pytest.fixture(scope="session")
def oracle_video_unet(oracle_unet2d: UNet2DConditionModel) -> VideoUNet:
    """The reference's inflated tiny UNet: tiny-sd's 2D weights plus its temporal weights."""
    from safetensors.torch import load_file

    from tavcli.method.video_unet import inflate_unet

    unet = inflate_unet(oracle_unet2d).eval()
    unet.load_state_dict(load_file(ORACLE / "unet3d_temporal.safetensors"), strict=False)
    return unet


@pytest.fixture
def run_tav(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunTav:
    """Run `tav ARGS...` in-process through the real entry point; return (exit code, stdout, stderr)."""
    from tavcli.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["tav", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _tiny_lora(folder: Path, targets: list[str], seed: int) -> Path:
    """A LoRA of the tiny model's UNet on `targets`, made with peft and saved the way diffusers tools save them."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from tavcli.models.resolving import resolve_model

    unet = UNet2DConditionModel.from_pretrained(resolve_model("tiny").folder / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA file for the tiny model's UNet (keys and values)."""
    return _tiny_lora(tmp_path_factory.mktemp("tiny-lora"), ["to_k", "to_v"], 0) / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def tiny_query_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder for the tiny model that also adapts `to_q`, the projection a tune replaces."""
    return _tiny_lora(tmp_path_factory.mktemp("tiny-query-lora"), ["to_q", "to_k"], 1)


@pytest.fixture(scope="session")
def tiny_controlnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from tavcli.models.resolving import resolve_model

    unet = UNet2DConditionModel.from_pretrained(resolve_model("tiny").folder / "unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    for param in controlnet.parameters():  # a trained ControlNet's zero convolutions are not zero
        torch.nn.init.normal_(param, std=0.05)
    folder = tmp_path_factory.mktemp("tiny-controlnet")
    controlnet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP model with random weights, saved and loaded like a downloaded one."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    text = {
        "vocab_size": 626,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 624,
        "eos_token_id": 625,
        "pad_token_id": 625,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    for file in TINY_TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def scheduler() -> Any:
    """The reference's tiny model's DDIM scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(TINY_SD / "scheduler")


@pytest.fixture(scope="session")
def embed() -> Any:
    """The reference's tiny text encoder: prompt -> (1, 77, d) embedding."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(TINY_SD / "text_encoder")

    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            embedding: torch.Tensor = encoder(ids)[0]
            return embedding

    return embed


def _guidance_consumer() -> str:
    """Which sampler the `Guidance.apply` being called serves, from the calls on the stack: attention control's
    source branch, the null-text fit, the edit's own sampling, or another."""
    names: set[str] = set()
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    for function, consumer in (("record_source", "branch"), ("optimise_null_text", "null-text")):
        if function in names:
            return consumer
    return "edit" if "ddim_sample" in names else "other"


@pytest.fixture
def guidance_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every `Guidance.apply` from now on, as (which sampler it serves, the `Guidance` applied)."""
    from tavcli.method.sampling import Guidance

    applied: list[tuple[str, Any]] = []
    apply = Guidance.apply

    def spied(self: Guidance, pred_uncond: Any, pred_cond: Any) -> Any:
        applied.append((_guidance_consumer(), self))
        return apply(self, pred_uncond, pred_cond)

    monkeypatch.setattr(Guidance, "apply", spied)
    return applied


def load_benchmark(name: str) -> Any:
    """`benchmarks/NAME.py` as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"tav_{name}", Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def without_temporal_output(unet: Any) -> Any:
    """`unet` inflated (seeded, in eval mode) with its temporal attention's output zeroed: on one-frame clips (or
    copies of one frame) the video UNet is then the image model."""
    import torch

    from tavcli.method.video_unet import inflate_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        video = inflate_unet(unet).eval()
    for name, param in video.named_parameters():
        if ".attn_temp.to_out" in name:
            torch.nn.init.zeros_(param)
    return video
