"""`tav tune --lora`: a LoRA is fused into the base model first, and is part of the model's identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


@pytest.mark.slow
def test_lora_changes_the_base_model_and_its_keys(tiny_lora: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    keys = {}
    for name, extra in [("plain", []), ("lora", ["--lora", str(tiny_lora)]), ("half", ["--lora", f"{tiny_lora}:0.5"])]:
        code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, *extra, "-p", project)
        assert code == 0, err
        keys[name] = json.loads(out.splitlines()[-1])["key"]
    assert len(set(keys.values())) == 3  # each LoRA and scale is another model
    meta = json.loads((project / "tunes" / keys["half"] / "meta.json").read_text())
    assert "|lora=" in meta["model"]["model"] and "+lora-" in meta["model"]["revision"]
    losses = {k: json.loads((project / "tunes" / v / "meta.json").read_text())["losses"] for k, v in keys.items()}
    assert losses["plain"] != losses["lora"] != losses["half"]
    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2")  # loads the same LoRA
    assert code == 0 and "loading model" in err and "|lora=" in err
    code, _, err = run_tav("tune", CLIP, "a man", *SMALL, "--lora", tmp_path / "missing.safetensors", "-p", project)
    assert code == 1 and "no LoRA at" in err
