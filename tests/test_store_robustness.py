"""What a user or a damaged store hands back to tav: sidecars and settings that are nested too deep or hold
numbers beyond a float, and sidecars of edits this session would not compute. Each is one line, and
nothing is computed or stored first; a null-text fit's edits go with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLIP, RunTav, tav_ok

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "2"]
NULL_TEXT = ["--steps", "2", "--inversion", "null-text", "--null-iterations", "1"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project holding a null-text edit (its inversion, fit, edit and render)."""
    project = tmp_path_factory.mktemp("null-text-edit") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "-p", project)
    tav_ok("edit", "a cat is skiing", "-p", project, *NULL_TEXT)
    return project


@pytest.fixture
def project(fitted: Path, tmp_path: Path) -> Path:
    """A copy of `fitted` for a test to change (sidecars name their project by its absolute path)."""
    copy = tmp_path / "p.tav"
    shutil.copytree(fitted, copy)
    for sidecar in (copy / "renders").glob("*.json"):
        sidecar.write_text(sidecar.read_text().replace(str(fitted.resolve()), str(copy.resolve())))
    return copy


def _sidecar(project: Path) -> tuple[Path, dict[str, Any]]:
    path = next((project / "renders").glob("*.mp4.json"))
    return path, json.loads(path.read_text())


def _entries(project: Path) -> set[str]:
    return {str(meta.parent.relative_to(project)) for meta in project.glob("*/*/meta.json")}


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_from_sidecar_with_another_precision_refuses_before_inverting_or_fitting(
    project: Path, run_tav: RunTav
) -> None:
    sidecar, record = _sidecar(project)
    before = _entries(project)
    code, out, err = run_tav("edit", "--from-sidecar", sidecar, "--precision", "bf16")
    assert code == 1 and out == "" and f"records edit {record['edit']['key']}" in err, err
    assert "--precision fp32" in err and "Traceback" not in err
    assert _entries(project) == before  # no bf16 inversion, null-text fit, embeddings or edit stored
    code, out, err = run_tav("edit", "--from-sidecar", sidecar)
    assert code == 0 and _records(out)[0]["cached"] is True, err


def test_removing_a_null_text_fit_takes_the_edits_made_with_it(project: Path, run_tav: RunTav) -> None:
    sidecar, record = _sidecar(project)
    fit, edit = record["null_text"]["key"], record["edit"]["key"]
    rows = {f"{row['kind']}/{row['key']}": row for row in _records(run_tav("ls", "-p", project, "--json")[1])}
    assert rows[f"edits/{edit}"]["parent"] == f"nulltexts/{fit}"
    code, out, err = run_tav("rm", f"nulltexts/{fit}", "-p", project, "--yes")
    assert code == 0, err
    assert [row["removed"] for row in _records(out)] == [f"edits/{edit}", f"nulltexts/{fit}"]
    assert not sidecar.exists() and not Path(str(sidecar).removesuffix(".json")).exists()
    code, out, err = run_tav("gc", "-p", project, "--yes")
    assert code == 0 and _records(out) == [], err  # nothing left behind
    assert f"inversions/{record['inversion']['key']}" in _entries(project)  # the inversion stays


def _deep(record: dict[str, Any]) -> str:
    return "[" * 100_000 + "]" * 100_000


def _huge_fps(record: dict[str, Any]) -> str:
    marked = json.dumps({**record, "output": {**record["output"], "fps": "FPS"}})
    return marked.replace('"FPS"', "1e400")  # json reads it as inf


def _huge_lora_scale(record: dict[str, Any]) -> str:
    return json.dumps({**record, "loras": [{"path": str(CLIP), "scale": int("9" * 400)}]})


def _infinite_lora_scale(record: dict[str, Any]) -> str:
    return json.dumps({**record, "loras": [{"path": str(CLIP), "scale": 1e400}]})


@pytest.mark.parametrize(
    ("damage", "status", "said"),
    [
        (_deep, 1, "is not a tav sidecar: lists and objects nested more than 32 levels deep"),
        (_huge_fps, 2, ": fps must be a finite number from 0.01 to 1,000, not inf"),
        (_huge_lora_scale, 2, ": a LoRA's scale must be a finite number, not inf"),
        (_infinite_lora_scale, 2, ": a LoRA's scale must be a finite number, not inf"),
    ],
)
def test_a_sidecar_too_deep_or_beyond_a_float_is_one_line(
    damage: Any, status: int, said: str, project: Path, run_tav: RunTav
) -> None:
    sidecar, record = _sidecar(project)
    sidecar.write_text(damage(record))
    before = _entries(project)
    code, out, err = run_tav("edit", "--from-sidecar", sidecar)
    assert code == status and out == "" and said in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and _entries(project) == before


def test_deeply_nested_settings_are_one_line(tmp_path: Path, run_tav: RunTav) -> None:
    root = tmp_path / "p.tav"
    root.mkdir()
    (root / "tav.toml").write_text("model = " + "[" * 5000 + "]" * 5000 + "\n")
    code, out, err = run_tav("config", "-p", root)
    assert code == 1 and out == "" and "tav.toml: its values nest too deeply" in err and "Traceback" not in err, err


def test_a_checkpoints_deeply_nested_metadata_is_damage_not_a_traceback() -> None:
    """A training state's JSON fields nested past the parser's recursion read as a damaged checkpoint (the
    ValueError `from_file` promises), which the tune reports in one line with the ways out."""
    import torch

    from tavcli.method.training import TrainState

    deep = "[" * 100_000 + "]" * 100_000
    metadata = {"step": "1", "param_groups": "[]", "scaler": "{}", "losses": deep, "device_type": "cpu"}
    with pytest.raises(ValueError, match="nests too deeply"):
        TrainState.from_file({"rng": torch.zeros(1)}, metadata, torch.device("cpu"))
