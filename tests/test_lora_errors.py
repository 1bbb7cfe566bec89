"""LoRA files that do not fit the model, or are no LoRA at all: one line, never a traceback; a batch goes on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from .conftest import CLIP, RunTav, edit_record, tav_ok

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


def _misfit_lora(folder: Path, cross_attention_dim: int) -> Path:
    """A LoRA of a model like the tiny one but whose cross-attention reads `cross_attention_dim`-wide text:
    another base model's LoRA, as far as the tiny model's shapes are concerned."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from tavcli.models.resolving import resolve_model

    config = dict(UNet2DConditionModel.load_config(resolve_model("tiny").folder / "unet"))
    unet = UNet2DConditionModel.from_config({**config, "cross_attention_dim": cross_attention_dim})
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def wide_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cross-attention 48 wide: no base model tav knows of."""
    return _misfit_lora(tmp_path_factory.mktemp("wide-lora"), 48)


@pytest.fixture(scope="module")
def sd2_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cross-attention 1024 wide: SD 2.x's text width."""
    return _misfit_lora(tmp_path_factory.mktemp("sd2-lora"), 1024)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("misfit") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "-p", project, "-q")
    return project


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "size mismatch" not in err, err
    return lines[0]


@pytest.mark.slow
def test_a_lora_for_another_base_is_one_line_in_tune_and_edit(
    tuned: Path, wide_lora: Path, sd2_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    code, _, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--lora", sd2_lora, "-p", tmp_path / "q.tav")
    line = _one_error_line(err)
    assert code == 1 and str(sd2_lora.resolve()) in line and "does not fit this model" in line
    assert "SD 2.x" in line and "1024" in line  # the width tells the base
    before = Path(edit_record(run_tav, tuned, "--steps", "1")["path"]).read_bytes()
    code, _, err = run_tav("edit", "a dog is skiing", "-p", tuned, "--steps", "1", "--lora", wide_lora)
    line = _one_error_line(err)
    assert code == 1 and str(wide_lora) in line and "does not fit this model" in line
    assert "SD " not in line and "SDXL" not in line  # 48 wide: no base is guessed
    after = edit_record(run_tav, tuned, "--steps", "1", "--force")  # the failed LoRA left nothing behind
    assert Path(after["path"]).read_bytes() == before


def test_the_base_a_lora_was_made_for_is_named_only_when_its_keys_or_widths_tell() -> None:
    from tavcli.models.lora import lora_base_guess

    def mismatch(name: str, given: tuple[int, int], here: tuple[int, int]) -> str:
        return (
            f"size mismatch for {name}: copying a param with shape torch.Size([{given[0]}, {given[1]}]) from "
            f"checkpoint, the shape in current model is torch.Size([{here[0]}, {here[1]}])."
        )

    attn2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.lora0.weight"
    attn1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.lora0.weight"
    text = "Error(s) in loading state_dict for UNet2DConditionModel:\n\t" + mismatch(attn2, (4, 1024), (4, 768))
    assert "SD 2.x" in lora_base_guess([], text) and "1024" in lora_base_guess([], text)
    assert "SDXL" in lora_base_guess([], mismatch(attn2, (4, 2048), (4, 768)))
    assert "SD 1.x" in lora_base_guess([], mismatch(attn2, (4, 768), (4, 1024)))
    assert "SDXL" in lora_base_guess(["text_encoder_2.text_model.encoder.layers.0.q_proj.lora_A.weight"], "")
    assert "SDXL" in lora_base_guess(["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "")
    assert "48" in lora_base_guess([], mismatch(attn2, (4, 48), (4, 32)))  # the widths, and no name
    assert "SD" not in lora_base_guess([], mismatch(attn2, (4, 48), (4, 32)))
    assert "SD" not in lora_base_guess([], mismatch(attn1, (4, 320), (4, 640)))  # no cross-attention: no guess


@pytest.mark.slow
def test_files_that_are_no_lora_for_this_model_are_one_line(tuned: Path, tmp_path: Path, run_tav: RunTav) -> None:
    import torch
    from safetensors.torch import save_file

    sdxl_only = tmp_path / "sdxl-text.safetensors"  # an SDXL LoRA of its second text encoder only
    key = "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer"
    save_file({f"{key}.down.weight": torch.zeros(4, 1280), f"{key}.up.weight": torch.zeros(1280, 4)}, sdxl_only)
    kohya = tmp_path / "kohya-sd1.safetensors"  # kohya's names, SD 1.x widths
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(4, 768),
            f"{name}.lora_up.weight": torch.zeros(32, 4),
            f"{name}.alpha": torch.tensor(4.0),
        },
        kohya,
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(kohya.read_bytes()[:100])
    for path, words in [(sdxl_only, "SDXL"), (kohya, "SD 1.x"), (truncated, "cannot load the LoRA")]:
        code, _, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "1", "--lora", path)
        line = _one_error_line(err)
        assert code == 1 and str(path) in line and words in line, line


def test_keep_going_survives_any_failure_of_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from tavcli.batch import running
    from tavcli.batch.jobs import Job

    def job(name: str) -> Job:
        return Job(name, name, Path("c.mp4"), "a man", (), Path("p.tav"), "tiny", {}, {}, {})

    class Made:
        def record(self) -> dict[str, object]:
            return {"kind": "tune", "path": "x", "key": "k", "cached": True, "seconds": 0.0}

    def artifacts(session: object, job: Job, stage: list[str]) -> object:
        if job.name == "bad":
            raise RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel:\n\tsize mismatch ...")
        yield Made()

    class Session:
        def release(self, model: str) -> None:
            pass

    monkeypatch.setattr(running, "_job_artifacts", artifacts)
    records: list[dict[str, object]] = []
    assert not running.run_jobs(cast(Any, Session()), [job("bad"), job("good")], True, records.append)
    assert [(r["job"], r["error"] is None) for r in records] == [("bad", False), ("good", True)]
    assert "RuntimeError" in str(records[0]["error"]) and "size mismatch" not in str(records[0]["error"])
    records.clear()
    assert not running.run_jobs(cast(Any, Session()), [job("bad"), job("good")], False, records.append)
    assert [r["job"] for r in records] == ["bad"]  # without --keep-going the first failure stops the rest


@pytest.mark.slow
def test_a_batch_goes_on_after_a_job_whose_lora_does_not_fit(wide_lora: Path, tmp_path: Path, run_tav: RunTav) -> None:
    small = {"model": "tiny", "frames": 2, "width": 32, "height": 32, "steps": 1, "project": str(tmp_path / "p.tav")}
    lines = [  # the same tune: the second job's edit runs on the UNet the first job's LoRA failed on
        {"name": "misfit", "clip": str(CLIP), "prompt": "a man", "edits": ["a dog"], **small},
        {"name": "fine", "clip": str(CLIP), "prompt": "a man", "edits": ["a cat"], **small},
    ]
    lines[0]["edit"] = {"steps": 1, "lora": [str(wide_lora)]}
    lines[1]["edit"] = {"steps": 1}
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl", "--keep-going")
    assert code == 1 and "Traceback" not in err, err
    records = [json.loads(line) for line in out.splitlines()]
    failed = [r for r in records if r["error"]]
    assert [(r["job"], r["kind"]) for r in failed] == [("misfit", "edit")]
    assert "does not fit this model" in failed[0]["error"]
    assert [r["kind"] for r in records if r["job"] == "fine"] == ["latents", "tune", "inversion", "edit"]


@pytest.mark.slow
def test_an_overflowing_lora_scale_is_blamed_and_fp32_is_not_suggested_in_an_fp32_run(
    tuned: Path, tiny_lora: Path, run_tav: RunTav
) -> None:
    code, _, err = run_tav(
        "edit", "a dog", "-p", tuned, "--steps", "1", "--precision", "fp32", "--lora", f"{tiny_lora}:1e30"
    )
    line = _one_error_line(err)
    assert code == 1 and "NaN or inf" in line and "LoRA scale may be too large" in line
    assert "bf16" not in line and "fp32" not in line


def test_the_overflow_hint_suggests_only_what_would_help() -> None:
    from tavcli.workflow.remedies import overflow_causes

    assert overflow_causes("fp32", ()) is None and overflow_causes("bf16", ()) is None
    # On this CPU bf16 is no remedy (tests/test_gpu_advice.py checks GPUs with and without bf16 cores).
    assert "--precision fp32" in str(overflow_causes("fp16", ())) and "LoRA" not in str(overflow_causes("fp16", ()))
    both = str(overflow_causes("fp16", ((Path("a.safetensors"), 1e30),)))
    assert "LoRA scale" in both and "--precision fp32" in both and "bf16" not in both


def test_a_tune_that_diverges_on_a_huge_lora_scale_names_the_scale(
    tiny_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    args: list[str | Path] = ["tune", CLIP, "a man", *SMALL, "--lora", f"{tiny_lora}:1e30", "-p", tmp_path / "p.tav"]
    code, out, err = run_tav(*args)
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert "a LoRA scale may be too large: try a smaller PATH:SCALE" in err and "try --precision" not in err, err
