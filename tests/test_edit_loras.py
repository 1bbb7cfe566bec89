"""`tav edit --lora`: LoRAs applied on top of the tuned model for one edit, composing with the tuned `to_q`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CLIP, RunTav, edit_record, tav_ok

SMALL = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("loras") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "-p", project)
    return project


def test_a_lora_adds_to_the_tuned_query_projection_and_comes_off_again(tuned: Path, tiny_query_lora: Path) -> None:
    """Inside the block each adapted layer computes (its tuned weight + scale * B @ A) x; after it, the exact
    tuned layer again, and the base model's weights never change."""
    from tavcli.models.lora import applied_loras
    from tavcli.runtime import resolve_runtime
    from tavcli.store.project import Project
    from tavcli.workflow.session import Session

    session = Session(resolve_runtime("cpu", "fp32"))
    project = Project(tuned)
    components, unet = session.tuned_unet(project, project.find("tunes", project.current_tune()))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(name)
    tuned_weight = layer.weight.detach().clone()
    base_weight = components.unet.get_submodule(name).weight.detach().clone()
    assert not torch.equal(tuned_weight, base_weight)  # the tune moved it
    lora = load_file(tiny_query_lora / "pytorch_lora_weights.safetensors")
    down, up = lora[f"unet.{name}.lora.down.weight"], lora[f"unet.{name}.lora.up.weight"]
    x = torch.randn(2, 5, tuned_weight.shape[1])
    before = unet.get_submodule(name)(x)
    scale = 0.5
    with applied_loras(components, unet, ((tiny_query_lora, scale),)):
        adapted = unet.get_submodule(name)(x)
        expected = x @ (tuned_weight + scale * up @ down).T
        torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    assert type(unet.get_submodule(name)) is torch.nn.Linear
    assert torch.equal(unet.get_submodule(name)(x), before)
    assert torch.equal(components.unet.get_submodule(name).weight, base_weight)


@pytest.mark.slow
def test_edit_loras_join_the_edit_key_and_reuse_the_tune_and_inversion(
    tuned: Path, tiny_lora: Path, tiny_query_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    plain = edit_record(run_tav, tuned)
    counts = {kind: len(list((tuned / kind).iterdir())) for kind in ("tunes", "inversions", "latents")}
    styled = edit_record(run_tav, tuned, "--lora", tiny_query_lora)
    assert styled["key"] != plain["key"]
    assert {kind: len(list((tuned / kind).iterdir())) for kind in counts} == counts  # nothing tuned or inverted
    half = edit_record(run_tav, tuned, "--lora", f"{tiny_query_lora}:0.5")
    both = edit_record(run_tav, tuned, "--lora", f"{tiny_query_lora}:0.5", "--lora", tiny_lora)
    assert len({plain["key"], styled["key"], half["key"], both["key"]}) == 4
    moved = tmp_path / "moved-lora"
    moved.mkdir()
    (moved / "pytorch_lora_weights.safetensors").write_bytes(
        (tiny_query_lora / "pytorch_lora_weights.safetensors").read_bytes()
    )
    again = edit_record(run_tav, tuned, "--lora", moved)
    assert again["key"] == styled["key"] and again["cached"] is True  # its content identifies it, not its path
    frames = [Path(record["path"]).read_bytes() for record in (plain, styled, half)]
    assert len(set(frames)) == 3
    spec = json.loads((tuned / "edits" / styled["key"] / "meta.json").read_text())["spec"]
    assert spec["loras"][0]["scale"] == 1.0 and spec["loras"][0]["sha256"]


@pytest.mark.slow
def test_an_edit_with_a_lora_is_reproduced_from_its_sidecar(
    tuned: Path, tiny_query_lora: Path, run_tav: RunTav
) -> None:
    styled = edit_record(run_tav, tuned, "--lora", f"{tiny_query_lora}:0.7")
    record = json.loads(Path(styled["sidecar"]).read_text())
    assert record["loras"] == [{"path": str(tiny_query_lora.resolve()), "scale": 0.7}]
    assert f"--lora {shlex.quote(f'{tiny_query_lora.resolve()}:0.7')}" in record["reproduce"][2]
    code, out, err = run_tav("edit", "--from-sidecar", styled["sidecar"])
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["key"] == styled["key"]


def test_a_missing_lora_is_refused_before_anything_loads(tuned: Path, tmp_path: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav("edit", "a dog", "-p", tuned, "--lora", tmp_path / "nothing.safetensors")
    assert code != 0 and "nothing.safetensors" in err and "Traceback" not in err
