"""`tav tune --preview`: kept states, preview edits, the loss curve and the sheet; `tav edit --tune-step`;
`tav tune --rank`: low-rank tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64"]
PREVIEW = ["--preview", "a panda is skiing", "--preview-every", "2", "--preview-steps", "2"]


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
def test_previews_keep_states_that_are_the_tunes_of_those_steps(
    tmp_path: Path, tiny_clip: Path, run_tav: RunTav
) -> None:
    project = tmp_path / "p.tav"
    code, out, err = run_tav(
        "tune", CLIP, "a man is skiing", *SMALL, "--steps", "6", *PREVIEW, "--eval", "--clip-model", tiny_clip,
        "-p", project,
    )  # fmt: skip
    assert code == 0, err
    records = _records(out)
    tunes = [r for r in records if r["kind"] == "tune"]
    assert [t["steps"] for t in tunes] == [2, 4, 6] and [t.get("kept") for t in tunes] == [True, True, None]
    previews = [r for r in records if r["kind"] == "edit"]
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert all(-1 <= p["scores"]["text_faithfulness"] <= 1 for p in previews)
    sheet = next(r for r in records if r["kind"] == "preview")
    picture = Image.open(sheet["path"])
    assert picture.width >= 900 and picture.height > 474 + 4 * 64  # the loss curve above 4 rows of frames
    grid = json.loads(Path(sheet["path"] + ".json").read_text())["grid"]
    assert grid["edits"] == [p["key"] for p in previews] and grid["steps"] == [2, 4, 6]
    assert [p.name for p in (project / "checkpoints").glob("*/*.safetensors")] == ["step-00000006.safetensors"]
    # A kept state is the very tune `--steps 2` makes, and the final one the tune made without previews.
    code, out, _ = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "2", "-p", project)
    again = [r for r in _records(out) if r["kind"] == "tune"][0]
    assert again["key"] == tunes[0]["key"] and again["cached"] is True
    plain = tmp_path / "plain.tav"
    code, out, _ = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "6", "-p", plain)
    final = [r for r in _records(out) if r["kind"] == "tune"][0]
    assert final["key"] == tunes[-1]["key"]
    tensors = Path("tunes") / final["key"] / "tensors.safetensors"
    assert (plain / tensors).read_bytes() == (project / tensors).read_bytes()
    # Every tune carries its loss curve, listed with its hash.
    meta = json.loads((project / "tunes" / final["key"] / "meta.json").read_text())
    assert "loss.png" in meta["files"] and Image.open(final["loss_plot"]).size == (900, 474)
    assert run_tav("verify", "-p", project)[0] == 0
    (project / "tunes" / final["key"] / "loss.png").write_bytes(b"not a picture")
    code, out, _ = run_tav("verify", "-p", project)
    assert code == 1 and "loss.png" in out
    # Editing a kept state.
    code, out, err = run_tav("edit", "a dog", "-p", plain, "--steps", "2", "--tune-step", "4")
    assert code == 1 and "kept no state at step 4 (kept: 6)" in err
    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "2", "--tune-step", "4")
    assert code == 0, err
    sidecar = json.loads(Path(_records(out)[0]["sidecar"]).read_text())
    assert sidecar["tune"]["key"] == tunes[1]["key"] and "--steps 4" in sidecar["reproduce"][0]


def test_eval_needs_previews(tmp_path: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav("tune", CLIP, "a man", *SMALL, "--steps", "2", "--eval", "-p", tmp_path / "p.tav")
    assert code == 2 and "--preview" in err


@pytest.mark.slow
def test_a_low_rank_tune_is_small_its_own_entry_and_resumable(tmp_path: Path, run_tav: RunTav) -> None:
    project, other = tmp_path / "p.tav", tmp_path / "q.tav"
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "2", "-p", project)
    full = _records(out)[-1]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "2", "--rank", "4", "-p", project)
    assert code == 0, err
    low = _records(out)[-1]
    assert low["key"] != full["key"] and low["rank"] == 4 and low["delta_bytes"] * 5 < full["delta_bytes"]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "4", "--rank", "4", "-p", project)
    assert code == 0 and "resuming from step 2" in err
    continued = _records(out)[-1]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "4", "--rank", "4", "-p", other)
    direct = _records(out)[-1]
    tensors = Path("tunes") / direct["key"] / "tensors.safetensors"
    assert continued["key"] == direct["key"] and (project / tensors).read_bytes() == (other / tensors).read_bytes()
    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "2")
    assert code == 0, err
    from tavcli.workflow.keys import describe

    code, out, _ = run_tav("ls", "-p", project, "--json")
    specs = [json.loads(line)["spec"] for line in out.splitlines() if json.loads(line)["kind"] == "tunes"]
    assert "rank 4" in describe("tunes", next(spec for spec in specs if spec.get("rank") == 4))
    # The temporal layers are re-created from the seed: a different start is refused, never edited with.
    meta_path = project / "tunes" / continued["key"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "temporal_init": "0" * 16}))
    code, _, err = run_tav("edit", "a cat", "-p", project, "--steps", "2")
    assert code == 1 and "cannot be rebuilt here" in err
