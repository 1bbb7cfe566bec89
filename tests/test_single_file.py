"""`--model FILE.safetensors`: single-file (original-format) checkpoints, converted once by diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tavcli.models.loading import load_components
from tavcli.models.names import model_name, parse_model_name, split_lora
from tavcli.models.resolving import resolve_model
from tavcli.settings.option import OptionError

from .conftest import CLIP, RunTav
from .ldm_format import ldm_checkpoint

SMALL = ["--frames", "2", "--width", "32", "--height", "32", "--steps", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as community checkpoints are shared: one file in the original layout, fp32 and fp16."""
    folder = tmp_path_factory.mktemp("checkpoints")
    weights = ldm_checkpoint(resolve_model("tiny").folder)
    save_file(weights, folder / "tiny.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, folder / "tiny-fp16.safetensors")
    torch.save({"state_dict": weights}, folder / "tiny.ckpt")
    return folder


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in module.state_dict().items()}


def _same_weights(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    a, b = _tensors(one), _tensors(other)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_converts_to_the_very_same_model(checkpoints: Path) -> None:
    cpu = torch.device("cpu")
    tiny = load_components(resolve_model("tiny"), cpu, torch.float32)
    source = resolve_model(model_name(str(checkpoints / "tiny.safetensors"), "tiny"))
    converted = load_components(source, cpu, torch.float32)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(tiny, part), getattr(converted, part)), part
    assert source.revision.startswith("file-") and source.folder.name == source.revision
    assert resolve_model(source.name) == source  # the recorded name finds the converted folder again


def test_an_fp16_checkpoint_is_cached_in_fp16_and_loads_as_float32(checkpoints: Path) -> None:
    source = resolve_model(model_name(str(checkpoints / "tiny-fp16.safetensors"), "tiny"))
    stored = load_file(source.folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}  # half the disk of float32, nothing lost
    unet = load_components(source, torch.device("cpu"), torch.float32).unet
    assert unet.dtype == torch.float32  # tuning keeps float32 master weights
    tiny = load_components(resolve_model("tiny"), torch.device("cpu"), torch.float32).unet
    halved = {k: v.half().float() for k, v in _tensors(tiny).items()}
    assert all(torch.equal(halved[k], v) for k, v in _tensors(unet).items())


def test_the_config_folder_decides_the_prediction_type(checkpoints: Path, tmp_path: Path) -> None:
    """An SD 2.x-style v-prediction checkpoint is read with a v-prediction model's configs."""
    configs = tmp_path / "tiny-v"
    shutil.copytree(resolve_model("tiny").folder, configs)
    scheduler = configs / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    plain = resolve_model(model_name(str(checkpoints / "tiny.safetensors"), "tiny"))
    velocity = resolve_model(model_name(str(checkpoints / "tiny.safetensors"), str(configs)))
    assert plain.revision != velocity.revision  # other configs, another model
    read = json.loads((velocity.folder / "scheduler" / "scheduler_config.json").read_text())
    assert read["prediction_type"] == "v_prediction"


@pytest.mark.slow
def test_tune_and_edit_a_single_file_model(checkpoints: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    file = checkpoints / "tiny.safetensors"
    args: list[str | Path] = ["--model", file, "--model-config", "tiny", *SMALL]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *args, "-p", project)
    assert code == 0, err
    tune = json.loads(out.splitlines()[-1])
    meta = json.loads((Path(tune["path"]) / "meta.json").read_text())
    assert parse_model_name(meta["model"]["model"]).base == str(file) and meta["model"]["revision"].startswith("file-")
    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2")  # loads the same model
    assert code == 0, err
    assert "converting" not in err  # converted once, by the tune
    # The same weights in a pickle: refused unless trusted, then they tune exactly alike.
    pickled: list[str | Path] = [
        "tune", CLIP, "a man is skiing", "--model", checkpoints / "tiny.ckpt", "--model-config", "tiny", *SMALL
    ]  # fmt: skip
    code, _, err = run_tav(*pickled, "-p", tmp_path / "ckpt.tav")
    assert code == 1 and "pickled checkpoint" in err and "--trust-pickle" in err
    assert not (tmp_path / "ckpt.tav" / "tunes").exists()
    code, out, err = run_tav(*pickled, "--trust-pickle", "-p", tmp_path / "ckpt.tav")
    assert code == 0, err
    ckpt_meta = json.loads((Path(json.loads(out.splitlines()[-1])["path"]) / "meta.json").read_text())
    assert ckpt_meta["losses"] == meta["losses"]


def test_single_file_mistakes_are_one_line_errors(checkpoints: Path, tmp_path: Path, run_tav: RunTav) -> None:
    file = checkpoints / "tiny.safetensors"
    base: list[str | Path] = ["tune", CLIP, "a man is skiing", *SMALL, "-p", tmp_path / "p.tav"]
    junk = tmp_path / "junk.safetensors"
    save_file({"something.weight": torch.zeros(3)}, junk)
    cases: dict[str, tuple[list[str | Path], str, str]] = {
        "offline, no configs": ([*base, "--model", file], "the hub is unreachable", "--model-config"),
        "not a checkpoint": ([*base, "--model", junk, "--model-config", "tiny"], "as a Stable Diffusion", "SD 1.x/2.x"),
        "config for a folder": (
            [*base, "--model", "tiny", "--model-config", "tiny"],
            "only applies to single-file",
            "",
        ),
        "config not a model": ([*base, "--model", file, "--model-config", tmp_path], "no model_index.json", ""),
    }
    for name, (args, message, hint) in cases.items():
        code, _, err = run_tav(*args)
        assert code == 1 and message in err and hint in err and "Traceback" not in err, name
    assert not (tmp_path / "p.tav" / "tunes").exists()
    models = resolve_model("tiny").folder.parent
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]  # no half-converted folder left


def test_a_model_config_in_settings_only_concerns_single_files(
    checkpoints: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    project = tmp_path / "p.tav"
    project.mkdir()
    (project / "tav.toml").write_text('model_config = "tiny"\n')
    code, _, err = run_tav("tune", CLIP, "a man is skiing", "--model", "tiny", *SMALL, "-p", project)
    assert code == 0, err
    file = checkpoints / "tiny.safetensors"
    code, out, err = run_tav("tune", CLIP, "a man is skiing", "--model", file, *SMALL, "-p", project)
    assert code == 0, err  # read with the project's model_config, offline
    tune = json.loads((Path(json.loads(out.splitlines()[-1])["path"]) / "meta.json").read_text())
    assert tune["model"]["model"] == f"{file}|config=tiny"


@pytest.mark.slow
def test_batch_jobs_take_single_files_relative_to_the_batch_file(
    checkpoints: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    shutil.copy(checkpoints / "tiny.safetensors", tmp_path / "model.safetensors")
    job: dict[str, object] = {
        "clip": str(CLIP),
        "prompt": "a man is skiing",
        "model": "model.safetensors",
        "model_config": "tiny",
        "project": str(tmp_path / "p.tav"),
    }
    job |= {"frames": 2, "width": 32, "height": 32, "steps": 1, "edits": ["a dog is skiing"], "edit": {"steps": 1}}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["kind"] for r in records] == ["latents", "tune", "inversion", "edit"]
    tune = json.loads((Path(records[1]["path"]) / "meta.json").read_text())
    assert tune["model"]["model"] == f"{tmp_path / 'model.safetensors'}|config=tiny"


def test_lora_scales_parse_one_way() -> None:
    assert split_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert split_lora("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert split_lora("style.safetensors:-0.5") == ("style.safetensors", -0.5)
    assert split_lora("dir:with:colons/style.safetensors") == ("dir:with:colons/style.safetensors", 1.0)
    for scale in ("nan", "inf", "-inf"):
        with pytest.raises(OptionError, match="finite"):
            split_lora(f"style.safetensors:{scale}")
    spec = parse_model_name("/m/x.safetensors|config=tiny|lora=/l/a.safetensors:0.5|lora=/l/b:1.0")
    assert spec.base == "/m/x.safetensors" and spec.config == "tiny"
    assert spec.loras == ((Path("/l/a.safetensors"), 0.5), (Path("/l/b"), 1.0))
