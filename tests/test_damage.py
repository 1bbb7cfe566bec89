"""A damaged store never stops the store tools, and a damaged entry is never used: truncated or garbage
checkpoints, payloads, meta.json and project.json are listed, verified, collected and refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "2"]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def project(tmp_path: Path, run_tav: RunTav) -> Path:
    """A project with a tune, an inversion, an edit and a render."""
    root = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", root)[0] == 0
    assert run_tav("edit", "a dog is skiing", "-p", root, "--steps", "2")[0] == 0
    return root


def _ls(run_tav: RunTav, root: Path) -> dict[str, dict]:
    code, out, err = run_tav("ls", "-p", root, "--json")
    assert code == 0 and "Traceback" not in err, err
    return {f"{row['kind']}/{row['key']}": row for row in _records(out)}


def _verify(run_tav: RunTav, root: Path) -> tuple[int, dict[str, dict]]:
    code, out, err = run_tav("verify", "-p", root, "--json")
    assert "Traceback" not in err, err
    return code, {f"{row['kind']}/{row['key']}": row for row in _records(out)}


def test_truncated_checkpoint_is_listed_verified_collected_and_named_by_tune(project: Path, run_tav: RunTav) -> None:
    checkpoint = next(project.glob("checkpoints/*/step-*.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    name = f"checkpoints/{checkpoint.parent.name}"
    assert _ls(run_tav, project)[name]["state"].startswith("damaged: ")
    code, rows = _verify(run_tav, project)
    assert code == 1 and not rows[name]["ok"] and "tav gc" in rows[name]["fix"]
    code, _, err = run_tav("tune", CLIP, "a man is skiing", *SMALL[:-1], "3", "-p", project)  # resumes from it
    assert code == 1 and "damaged checkpoint" in err and "--force" in err and "Traceback" not in err
    code, out, err = run_tav("gc", "-p", project, "--yes")
    assert code == 0 and [r["removed"] for r in _records(out)] == [name] and str(checkpoint) in err
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL[:-1], "3", "-p", project)[0] == 0
    assert run_tav("verify", "-p", project)[0] == 0


def test_garbage_checkpoint_and_one_with_nan_are_found(project: Path, run_tav: RunTav) -> None:
    checkpoint = next(project.glob("checkpoints/*/step-*.safetensors"))
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoint)
    state[next(name for name in state if name.startswith("param/"))] *= float("nan")
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as file:
        metadata = file.metadata()
    save_file(state, checkpoint, metadata)
    code, rows = _verify(run_tav, project)
    assert code == 1 and "NaN or inf" in " ".join(rows[f"checkpoints/{checkpoint.parent.name}"]["problems"])
    checkpoint.write_bytes(b"\xff" * 64)
    assert _ls(run_tav, project)[f"checkpoints/{checkpoint.parent.name}"]["state"].startswith("damaged")


def test_meta_without_its_payload_listed_is_damaged_even_if_the_payload_is_truncated(
    project: Path, run_tav: RunTav
) -> None:
    tune = next(project.glob("tunes/*"))
    meta = json.loads((tune / "meta.json").read_text())
    (tune / "meta.json").write_text(json.dumps({**meta, "files": {}}))
    payload = tune / "tensors.safetensors"
    payload.write_bytes(payload.read_bytes()[:1000])
    assert "does not list its payload" in _ls(run_tav, project)[f"tunes/{tune.name}"]["state"]
    code, rows = _verify(run_tav, project)
    assert code == 1 and not rows[f"tunes/{tune.name}"]["ok"]
    code, _, err = run_tav("edit", "a cat", "-p", project, "--steps", "2")
    assert code == 1 and "does not list its payload" in err and f"tav rm tunes/{tune.name}" in err


def test_nan_in_a_payload_with_a_matching_hash_is_refused_and_verified(project: Path, run_tav: RunTav) -> None:
    """What an older tav stored from `--lr inf`: NaN tensors whose recorded hash matches."""
    from safetensors.torch import load, save

    tune = next(project.glob("tunes/*"))
    payload = tune / "tensors.safetensors"
    tensors = load(payload.read_bytes())
    data = save({name: torch.full_like(t, float("nan")) for name, t in tensors.items()})
    payload.write_bytes(data)
    meta = json.loads((tune / "meta.json").read_text())
    meta["files"]["tensors.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (tune / "meta.json").write_text(json.dumps(meta))
    for edit in project.glob("edits/*"):
        (edit / "meta.json").unlink()  # so that the next edit needs the tune
    code, rows = _verify(run_tav, project)
    assert code == 1 and "NaN or inf" in " ".join(rows[f"tunes/{tune.name}"]["problems"])
    code, out, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2", "--force")
    assert code == 1 and out == "" and "NaN or inf" in err


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"store_version": 1, "tune": 5, "inversion": [1]}', "tune is 5, not an entry key"),
        ('{"store_version": "one"}', "store_version is 'one', not an integer"),
        ("[1, 2]", "not a JSON object"),
        ('{"tune": "0123', "not JSON"),
    ],
)
def test_damaged_project_json(project: Path, content: str, problem: str, run_tav: RunTav) -> None:
    state = json.loads((project / "project.json").read_text())
    (project / "project.json").write_text(content)
    assert _ls(run_tav, project)["project/project.json"]["state"].startswith(f"damaged: {problem}")
    code, rows = _verify(run_tav, project)
    assert code == 1 and "rebuilt from the entries" in rows["project/project.json"]["fix"]
    code, out, err = run_tav("edit", "a cat", "-p", project, "--steps", "2")
    assert code == 1 and out == "" and problem in err and "tav gc" in err
    code, out, _ = run_tav("gc", "-p", project, "--yes")
    assert code == 0 and [r["removed"] for r in _records(out)] == ["project/project.json"]
    assert run_tav("edit", "a cat", "-p", project, "--steps", "2")[0] == 0  # rebuilt: the only tune and inversion
    assert json.loads((project / "project.json").read_text()) == state


def test_missing_project_json_is_rebuilt_only_when_unambiguous(project: Path, run_tav: RunTav) -> None:
    (project / "project.json").unlink()
    assert run_tav("edit", "a cat", "-p", project, "--steps", "2")[0] == 0
    assert json.loads((project / "project.json").read_text())["tune"]
    assert sorted(p.name for p in project.glob("project.json*")) == ["project.json"]  # no temporary file left
    assert run_tav("tune", CLIP, "a woman is skiing", *SMALL, "-p", project)[0] == 0  # a second tune
    (project / "project.json").unlink()
    code, _, err = run_tav("edit", "a cat", "-p", project, "--steps", "2")
    assert code == 1 and "does not say which of the project's 2 tunes" in err
    assert run_tav("ls", "-p", project)[0] == 0


def test_rm_lists_every_file_and_gc_finds_orphaned_renders_and_grids(tmp_path: Path, run_tav: RunTav) -> None:
    root = tmp_path / "g.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", root)[0] == 0
    code, out, err = run_tav("edit", "a dog", "a cat", "-p", root, "--steps", "2", "--grid")
    assert code == 0, err
    records = _records(out)
    grid = next(r for r in records if r["kind"] == "grid")
    dog = next(r for r in records if r.get("prompt") == "a dog")
    code, out, err = run_tav("rm", f"edits/{dog['key']}", "-p", root, "--dry-run")
    for path in (dog["path"], dog["sidecar"], grid["path"], grid["gif"], grid["sheet"]):
        assert path in err, path
    assert run_tav("rm", f"edits/{dog['key']}", "-p", root, "--yes")[0] == 0
    assert not any(Path(p).exists() for p in (dog["path"], grid["path"], grid["gif"], grid["sheet"]))
    # A grid whose edit was removed behind tav's back is an orphan for gc.
    code, out, err = run_tav("edit", "a dog", "a cat", "-p", root, "--steps", "2", "--grid")
    records = _records(out)
    dog, cat, grid = (next(r for r in records if pick(r)) for pick in (_prompt("a dog"), _prompt("a cat"), _grid))
    import shutil

    shutil.rmtree(root / "edits" / cat["key"])
    code, out, err = run_tav("gc", "-p", root, "--yes")
    removed = [r["removed"] for r in _records(out)]
    assert f"render/{Path(grid['path']).name}" in removed and f"render/{Path(cat['path']).name}" in removed
    assert not Path(grid["gif"]).exists() and not Path(cat["path"]).exists()
    assert Path(dog["path"]).exists()  # its edit is still there


def _prompt(text: str) -> Callable[[dict], bool]:
    return lambda record: record.get("prompt") == text


def _grid(record: dict) -> bool:
    return record["kind"] == "grid"


def test_nonsense_in_meta_checkpoint_header_and_grid_sidecar_is_damage_not_a_crash(
    project: Path, run_tav: RunTav
) -> None:
    edit_meta = next(project.glob("edits/*/meta.json"))
    edit_meta.write_text("[]")
    checkpoint = next(project.glob("checkpoints/*/step-*.safetensors"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": 4}}).encode()
    checkpoint.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    outside = project.parent / "precious.txt"
    outside.write_text("not tav's")
    grid = {"grid": {"key": "0badc0de", "edits": ["0" * 16], "files": ["../../precious.txt"]}}
    (project / "renders" / "grid-0badc0de.mp4.json").write_text(json.dumps(grid))
    listed = _ls(run_tav, project)
    assert listed[f"edits/{edit_meta.parent.name}"]["state"].startswith("damaged")
    assert listed[f"checkpoints/{checkpoint.parent.name}"]["state"].startswith("damaged")
    code, rows = _verify(run_tav, project)
    assert code == 1
    code, out, err = run_tav("gc", "-p", project, "--yes")
    assert code == 0 and "Traceback" not in err, err
    assert outside.read_text() == "not tav's"
    assert not edit_meta.parent.exists() and not checkpoint.exists()
