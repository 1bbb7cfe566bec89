"""SDXL from the command line (narrow, random weights): tune (full and low-rank, checkpointed), the clip's size
numbers recorded, DDIM and null-text inversion, edits with attention control and local blend, an SDXL
ControlNet and T2I-Adapter (and a ControlNet for another base refused in one line), a batch job, and `--vae`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tavcli.models.architectures import build_model

from .conftest import CLIP, RunTav

SMALL = ["--steps", "2", "--frames", "3", "--width", "64", "--height", "48"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", narrow=True)


@pytest.fixture(scope="module")
def tuned(sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project tuned on the narrow SDXL (run once for the module, through the real entry point)."""
    import subprocess
    import sys

    project = tmp_path_factory.mktemp("tuned") / "p.tav"
    command = [sys.executable, "-m", "tavcli", "tune", CLIP, "a man is skiing", "--model", sdxl, "-p", project, *SMALL]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return project


def _latents(project: Path, record: dict[str, object]) -> torch.Tensor:
    return load_file(project / "edits" / str(record["key"]) / "tensors.safetensors")["latents"]


def test_a_tune_records_the_clips_size_numbers_as_sdxl_was_trained(tuned: Path) -> None:
    """The 256x256 clip scaled to cover 64x48 is 64x64, cropped 8 rows from the top: (256, 256, 8, 0, 48, 64)."""
    [meta] = [json.loads(path.read_text()) for path in tuned.glob("tunes/*/meta.json")]
    assert meta["clip"]["size_conditioning"] == [256, 256, 8, 0, 48, 64]
    assert meta["model"]["model"].endswith("sdxl")


def test_sdxl_inverts_and_edits_with_attention_control(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("invert", "-p", tuned, "--steps", "3")
    assert code == 0, err
    edit: list[str | Path] = ["edit", "a panda is skiing", "-p", tuned, "--steps", "3"]
    code, out, err = run_tav(*edit)
    assert code == 0, err
    plain = json.loads(out.splitlines()[-1])
    code, out, err = run_tav(
        *edit, "--inversion", "null-text", "--null-iterations", "2", "--cross-replace", "0.8", "--self-replace", "0.4",
        "--blend-source", "man", "--blend-edit", "panda", "--attention-from", "trajectory",
    )  # fmt: skip
    assert code == 0, err
    controlled = json.loads(out.splitlines()[-1])
    assert controlled["key"] != plain["key"] and Path(controlled["path"]).is_file()
    a, b = _latents(tuned, plain), _latents(tuned, controlled)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    fits = list(tuned.glob("nulltexts/*/tensors.safetensors"))
    [embeddings] = [load_file(path)["embeddings"] for path in fits]
    # The fitted unconditional input is SDXL's whole one: 77 tokens and the pooled row, per step.
    # It starts at zeros (force_zeros_for_empty_prompt); the padding after the 64 pooled values gets no gradient.
    assert embeddings.shape[-2:] == (78, 96) and embeddings[:, :, -1, :64].abs().sum() > 0
    assert not embeddings[:, :, -1, 64:].any()


@pytest.fixture(scope="module")
def sdxl_controlnet(sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl / "unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    for param in controlnet.parameters():  # a trained ControlNet's zero convolutions are not zero
        torch.nn.init.normal_(param, std=0.05)
    folder = tmp_path_factory.mktemp("sdxl-controlnet")
    controlnet.save_pretrained(folder)
    return folder


def test_an_sdxl_controlnet_and_t2i_adapter_condition_the_edit(
    tuned: Path, sdxl_controlnet: Path, tiny_controlnet: Path, run_tav: RunTav, tmp_path: Path
) -> None:
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    adapter = T2IAdapter(
        in_channels=3,
        channels=[40, 80, 160, 160],
        num_res_blocks=1,
        downscale_factor=16,
        adapter_type="full_adapter_xl",
    )
    adapter.save_pretrained(tmp_path / "adapter")
    edit: list[str | Path] = ["edit", "a panda is skiing", "-p", tuned, "--steps", "2"]
    code, out, err = run_tav(*edit)
    assert code == 0, err
    plain = _latents(tuned, json.loads(out.splitlines()[-1]))
    for model in (sdxl_controlnet, tmp_path / "adapter"):
        code, out, err = run_tav(*edit, "--control", "pose", "--control-model", model, "--control-video", CLIP)
        assert code == 0, err
        assert not torch.allclose(_latents(tuned, json.loads(out.splitlines()[-1])), plain)
    code, out, err = run_tav(*edit, "--control", "pose", "--control-model", tiny_controlnet, "--control-video", CLIP)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "made for 32-wide text, and this tune's model is SDXL" in err


def test_sdxl_tunes_low_rank_with_gradient_checkpointing_in_a_batch_job(
    sdxl: Path, run_tav: RunTav, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        f'[[job]]\nclip = "{CLIP}"\nprompt = "a man is skiing"\nmodel = "{sdxl}"\nproject = "{tmp_path / "b.tav"}"\n'
        'edits = ["a panda is skiing"]\nsteps = 2\nframes = 2\nwidth = 64\nheight = 64\nrank = 4\n'
        "gradient_checkpointing = true\n[job.edit]\nsteps = 2\n"
    )
    code, out, err = run_tav("batch", jobs)
    assert code == 0, err
    kinds = [json.loads(line)["kind"] for line in out.splitlines() if line.startswith("{")]
    assert {"tune", "inversion", "edit"} <= set(kinds)
    [spec] = [json.loads(p.read_text())["spec"] for p in (tmp_path / "b.tav").glob("tunes/*/meta.json")]
    assert spec["rank"] == 4


def test_a_vae_given_with_vae_is_loaded_and_keyed(sdxl: Path, run_tav: RunTav, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # another decoder: the same latents decode to other pixels
    vae.save_pretrained(tmp_path / "vae")
    tune: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", sdxl, *SMALL, "--steps", "1"]
    code, out, err = run_tav(*tune, "-p", tmp_path / "own.tav")
    assert code == 0, err
    own = json.loads(out.splitlines()[-1])
    code, out, err = run_tav(*tune, "-p", tmp_path / "swapped.tav", "--vae", tmp_path / "vae")
    assert code == 0, err
    swapped = json.loads(out.splitlines()[-1])
    assert swapped["key"] != own["key"]  # the VAE is part of the model's identity
    meta = json.loads((Path(swapped["path"]) / "meta.json").read_text())
    assert f"|vae={tmp_path / 'vae'}" in meta["model"]["model"] and "+vae-" in meta["model"]["revision"]
    code, _, err = run_tav(*tune, "-p", tmp_path / "bad.tav", "--vae", tmp_path / "missing")
    assert code == 1 and "--vae" in err and len(err.strip().splitlines()) == 1, err


def test_a_half_precision_run_keeps_a_force_upcast_vae_in_float32(sdxl: Path) -> None:
    """SDXL's VAE overflows in fp16: as diffusers' pipeline does, it stays float32 while the rest is half."""
    from tavcli.models.loading import load_components
    from tavcli.models.source import ModelSource

    components = load_components(ModelSource("sdxl", sdxl, "test"), torch.device("cpu"), torch.float16)
    assert components.vae.dtype == torch.float32 and components.text_encoder_2 is not None
    assert components.text_encoder_2.dtype == torch.float16
    # SD's pipeline never upcasts, though diffusers' config default says `force_upcast` for every VAE.
    from tavcli.models.resolving import resolve_model

    sd = load_components(resolve_model("tiny"), torch.device("cpu"), torch.float16)
    assert sd.vae.config.force_upcast and sd.vae.dtype == torch.float16


def test_the_size_numbers_are_rounded_to_the_runs_precision_as_the_pipeline_makes_them() -> None:
    """diffusers builds `add_time_ids` in the text's dtype: under bf16 a 854-wide clip is 856 wide to SDXL."""
    from types import SimpleNamespace

    from tavcli.runtime import Runtime
    from tavcli.store.specs import ClipFacts
    from tavcli.workflow.session import Session, size_time_ids

    clip: ClipFacts = {"path": "c.mp4", "fps": "30", "frames": 6, "stride": 2, "start": 0, "width": 512,
                       "height": 512, "resize": "crop", "size_conditioning": [480, 854, 0, 21, 512, 512]}  # fmt: skip
    sdxl = SimpleNamespace(config=SimpleNamespace(
        addition_embed_type="text_time", projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256
    ))  # fmt: skip
    for precision, width in (("fp32", 854), ("fp16", 854), ("bf16", 856)):
        time_ids = size_time_ids(Session(Runtime(torch.device("cpu"), precision)), clip, sdxl)
        assert time_ids is not None and time_ids.tolist() == [480, width, 0, 21, 512, 512]
    sd = SimpleNamespace(config=SimpleNamespace(addition_embed_type=None))
    assert size_time_ids(Session(Runtime(torch.device("cpu"), "fp32")), clip, sd) is None


def test_a_vae_that_normalises_latents_is_refused_in_one_line(tmp_path: Path) -> None:
    """Playground v2.5's VAE config has `latents_mean`/`latents_std`, which the SDXL pipeline applies; tavcli
    does not, so such a model is refused rather than computed wrongly."""
    from tavcli.errors import TavError
    from tavcli.models.families import require_supported

    for part, config in (("unet", {"in_channels": 4}), ("vae", {"latents_mean": [0.0] * 4})):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    with pytest.raises(TavError, match="normalises latents by a mean and std"):
        require_supported(tmp_path, "playground")


def test_sdxl_takes_its_own_defaults_where_the_flags_say_nothing(sdxl: Path, run_tav: RunTav, tmp_path: Path) -> None:
    """The paper's 24 frames do not fit a 24 GB card on SDXL: its own defaults are 6 frames, checkpointed."""
    tune: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", sdxl, "-p", tmp_path / "d.tav", "--dry-run"]
    code, out, err = run_tav(*tune)
    assert code == 0, err
    assert "SDXL model: --frames 6, --gradient-checkpointing by default" in err
    plan = json.loads(out.splitlines()[0])
    assert "6 frames at 512x512" in plan["memory"]["summary"] and "gradient checkpointing" in plan["memory"]["summary"]
    code, out, err = run_tav(*tune, "--frames", "3", "--no-gradient-checkpointing")
    assert code == 0 and "by default" not in err, err
    summary = json.loads(out.splitlines()[0])["memory"]["summary"]
    assert "3 frames at 512x512" in summary and "checkpointing" not in summary


def test_an_sdxl_hub_model_fetches_every_part_it_loads(
    sdxl: Path, run_tav: RunTav, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub download asks for SDXL's second text encoder and tokenizer too: a snapshot holding only what the
    download's patterns select (as the hub filters them) tunes."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    files = [path.relative_to(sdxl).as_posix() for path in sdxl.rglob("*") if path.is_file()]
    snapshot = tmp_path / "snapshots" / "0123abcd"

    def download(repo_id: str, allow_patterns: list[str] | None = None, **kwargs: object) -> str:
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sdxl / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    tune: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", "org/sdxl", *SMALL, "--steps", "1"]
    code, out, err = run_tav(*tune, "-p", tmp_path / "h.tav")
    assert code == 0, err
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/merges.txt"} <= {
        path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*")
    }
