"""`tav import`: a folder saved by the reference training script becomes a tune, checked against its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CLIP, ORACLE, TINY_SD, RunTav
from .reference_format import write_reference_output


def _reference_folder(path: Path, tamper: bool = False, pickled: bool = False, seed: int = 33) -> Path:
    """The layout the reference script writes: unet/ with the full video UNet, and config.yaml."""
    weights = {
        **load_file(TINY_SD / "unet" / "diffusion_pytorch_model.safetensors"),
        **load_file(ORACLE / "unet3d_temporal.safetensors"),
    }
    weights = {k: v.clone() for k, v in weights.items()}
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    weights[to_q] += 0.5  # "tuned"
    if tamper:
        weights["conv_in.weight"] += 1.0  # a frozen tensor that is not the base model's
    run = (
        f'pretrained_model_path: "{TINY_SD}"\n'
        "train_data:\n"
        f'  video_path: "{CLIP}"\n'
        '  prompt: "a man is skiing"\n'
        "  n_sample_frames: 4\n  width: 32\n  height: 32\n  sample_start_idx: 0\n  sample_frame_rate: 2\n"
        f"learning_rate: 3e-5\nmax_train_steps: 300\nseed: {seed}\n"
    )
    unet_config = json.loads((TINY_SD / "unet" / "config.json").read_text())
    return write_reference_output(path, weights, unet_config, run, pickled)


@pytest.mark.slow
def test_import_keeps_the_reference_tune_and_edits_from_it(tmp_path: Path, run_tav: RunTav) -> None:
    folder = _reference_folder(tmp_path / "outputs" / "man-skiing")
    project = tmp_path / "imported.tav"
    code, out, err = run_tav("import", folder, "-p", project)
    assert code == 0, err
    tune = [json.loads(line) for line in out.splitlines()][-1]
    delta = load_file(Path(tune["path"]) / "tensors.safetensors")
    temporal = load_file(ORACLE / "unet3d_temporal.safetensors")
    assert all(torch.equal(delta[name], tensor) for name, tensor in temporal.items())  # attn_temp and norm_temp
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = load_file(TINY_SD / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(delta[to_q], base[to_q] + 0.5)
    assert not any(name.startswith("conv_in") for name in delta)  # only tuned tensors are kept
    meta = json.loads((Path(tune["path"]) / "meta.json").read_text())
    assert meta["spec"]["steps"] == 300 and meta["spec"]["prompt"] == "a man is skiing"

    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2")
    assert code == 0, err
    assert run_tav("import", folder, "-p", project)[1].count('"cached": true') == 2  # importing twice: nothing new


def test_import_refuses_other_bases_and_pickles(tmp_path: Path, run_tav: RunTav) -> None:
    tampered = _reference_folder(tmp_path / "tampered", tamper=True)
    code, _, err = run_tav("import", tampered, "-p", tmp_path / "a.tav")
    assert code == 1 and "tuned from another base model" in err and "conv_in.weight" in err
    pickled = _reference_folder(tmp_path / "pickled", pickled=True, seed=0)
    code, _, err = run_tav("import", pickled, "-p", tmp_path / "b.tav")
    assert code == 1 and "--trust-pickle" in err
    code, out, err = run_tav("import", pickled, "-p", tmp_path / "b.tav", "--trust-pickle")
    assert code == 0, err
    tune = json.loads(out.splitlines()[-1])
    assert json.loads((Path(tune["path"]) / "meta.json").read_text())["spec"]["seed"] == 0  # the run's, not 33
    code, _, err = run_tav(
        "import", pickled, "-p", tmp_path / "b.tav", "--trust-pickle", "--clip", tmp_path / "typo.mp4"
    )
    assert code != 0 and "typo.mp4" in err and "Traceback" not in err  # never the recorded clip instead
    shutil.rmtree(tmp_path / "pickled" / "unet")
    code, _, err = run_tav("import", pickled, "-p", tmp_path / "c.tav")
    assert code == 1 and "not a Tune-A-Video output folder" in err
