"""`tav eval` and `tav edit --eval`: CLIP frame consistency and text faithfulness, with a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "3", "--width", "32", "--height", "32", "--steps", "1"]


def test_scores_are_the_defined_cosine_similarities(tiny_clip: Path) -> None:
    import torch.nn.functional as F

    from tavcli.method.metrics import ClipScorer, _features

    scorer = ClipScorer(str(tiny_clip), torch.device("cpu"))
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 255, (1, 48, 48, 3), dtype=np.uint8), 4, axis=0)
    scores = scorer.score(still, "a man is skiing")
    assert scores.frame_consistency == pytest.approx(1.0, abs=1e-5) and scores.frames == 4
    moving = rng.integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
    varied = scorer.score(moving, "a man is skiing")
    assert varied.frame_consistency < 0.9999
    with torch.no_grad():  # the definition, computed independently for one frame
        pixels = scorer.processor(images=[still[0]], return_tensors="pt").pixel_values
        image = F.normalize(_features(scorer.model.get_image_features(pixel_values=pixels)), dim=-1)
        ids = scorer.tokenizer(["a man is skiing"], padding="max_length", return_tensors="pt").input_ids
        text = F.normalize(_features(scorer.model.get_text_features(input_ids=ids)), dim=-1)
    assert scores.text_faithfulness == pytest.approx(float(image @ text.T), abs=1e-5)


@pytest.mark.slow
def test_eval_and_edit_eval_write_scores_into_sidecars(tiny_clip: Path, tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    code, out, err = run_tav(
        "edit", "a dog is skiing", "-p", project, "--steps", "1", "--eval", "--clip-model", tiny_clip
    )
    assert code == 0, err
    record = json.loads(out)
    assert set(record["scores"]) == {"clip_model", "frame_consistency", "text_faithfulness", "frames"}
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    assert sidecar["scores"]["text_faithfulness"] == record["scores"]["text_faithfulness"]

    code, out, err = run_tav("eval", record["path"], "--clip-model", tiny_clip, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["prompt"] == "a dog is skiing" and again["frames"] == 3
    assert again["frame_consistency"] == pytest.approx(record["scores"]["frame_consistency"], abs=1e-4)
    code, _, err = run_tav("eval", record["path"], "--clip-model", tiny_clip)
    assert code == 0 and "consistency" in err
    code, out, _ = run_tav("eval", record["path"], "--clip-model", tiny_clip, "--prompt", "a cat", "--json")
    assert json.loads(out)["prompt"] == "a cat"


def test_eval_errors_are_one_line(tiny_clip: Path, tmp_path: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav("eval", CLIP, "--clip-model", "openai/clip-vit-large-patch14")
    assert code == 1 and "--clip-model" in err and "Traceback" not in err
    code, _, err = run_tav("eval", CLIP, "--clip-model", tiny_clip)
    assert code == 1 and "pass --prompt" in err
    code, out, err = run_tav("eval", CLIP, "--clip-model", tiny_clip, "--prompt", "a man is skiing", "--json")
    assert code == 0 and json.loads(out)["frames"] == 48


def test_edit_eval_finds_its_clip_model_before_any_work(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    small = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
    assert run_tav("tune", CLIP, "a man is skiing", *small, "-p", project)[0] == 0
    evaluate: list[str | Path] = ["--eval", "--clip-model", tmp_path / "none"]
    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "1", *evaluate)
    assert code == 1 and out == "" and "cannot load the CLIP model" in err, err
    assert not (project / "inversions").exists() and not (project / "edits").exists()
