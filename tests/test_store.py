"""The project store: keys, payload hashes, listing that survives damage, removal order, garbage, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tavcli.errors import TavError
from tavcli.store.entry import Entry
from tavcli.store.housekeeping import dependents, garbage, listing
from tavcli.store.project import STORE_VERSION, Project, cache_key
from tavcli.store.removal import removal_files, removal_plan, remove

from .conftest import RunTav


def _project(tmp_path: Path, with_edit: bool = True) -> tuple[Project, dict[str, Entry]]:
    """A project with a latents entry, a tune on it, an inversion of that and (`with_edit`) an edit of that
    and its render; the tune and inversion are the current ones."""
    project = Project(tmp_path / "p.tav")
    latents = project.entry("latents", {"clip_sha256": "abc"})
    latents.save({"mean": torch.zeros(2)}, {})
    tune = project.entry("tunes", {"latents": latents.key, "prompt": "a man", "steps": 3})
    tune.save({"w": torch.ones(3)}, {})
    inversion = project.entry("inversions", {"tune": tune.key, "steps": 2, "prompt": ""})
    inversion.save({"trajectory": torch.ones(2)}, {})
    entries = {"latents": latents, "tune": tune, "inversion": inversion}
    if with_edit:
        edit = project.entry("edits", {"inversion": inversion.key, "prompt": "a panda"})
        edit.save({"latents": torch.ones(2)}, {})
        renders = project.root / "renders"
        renders.mkdir()
        (renders / "a-panda.mp4").write_bytes(b"video")
        (renders / "a-panda.mp4.json").write_text(json.dumps({"edit": {"key": edit.key}}))
        entries["edit"] = edit
    project.update_state(tune=tune.key, inversion=inversion.key)
    return project, entries


def test_keys_depend_on_every_spec_field_and_kind() -> None:
    base = {"prompt": "a man is skiing", "steps": 500}
    assert cache_key(base) == cache_key(dict(reversed(base.items())))
    assert cache_key(base) != cache_key({**base, "steps": 501})
    assert cache_key({"kind": "tunes", **base}) != cache_key({"kind": "edits", **base})


def test_meta_records_payload_hash_and_problems_are_found(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    tune = entries["tune"]
    meta = tune.meta()
    assert meta["files"]["tensors.safetensors"]["bytes"] == (tune.path / "tensors.safetensors").stat().st_size
    assert tune.problems() == []
    payload = tune.path / "tensors.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    assert tune.problems() == ["tensors.safetensors does not match its recorded SHA-256"]
    payload.unlink()
    assert tune.problems() == ["tensors.safetensors is missing"]


def test_listing_reports_damaged_and_incomplete_entries_without_raising(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    (entries["inversion"].path / "meta.json").write_text("{not json")
    (project.root / "edits" / "0123456789abcdef").mkdir()
    states = {(row.kind, row.key[:4]): row.state for row in listing(project)}
    assert states[("inversions", entries["inversion"].key[:4])].startswith("damaged")
    assert states[("edits", "0123")] == "incomplete"
    assert states[("tunes", entries["tune"].key[:4])] == "complete"


def test_removal_takes_dependents_children_first_and_clears_pointers(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    rows = {row.kind: row for row in listing(project)}
    plan = dependents(project, [rows["tunes"]])
    assert [row.kind for row in plan] == ["edits", "inversions", "tunes"]
    for row in plan:
        remove(project, row)
    assert project.state["tune"] is None and project.state["inversion"] is None
    assert not (project.root / "renders" / "a-panda.mp4").exists()
    assert not (project.root / "renders" / "a-panda.mp4.json").exists()
    assert [row.kind for row in listing(project)] == ["latents"]


def test_garbage_is_interrupted_orphaned_and_dead_processes_temp_files(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    (entries["inversion"].path / "meta.json").unlink()  # interrupted inversion
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    temp = project.root / "tunes" / f".tensors.safetensors.{dead.stdout.strip()}.0badc0de.tmp"
    temp.write_bytes(b"half")
    live = project.root / "tunes" / f".tensors.safetensors.{os.getpid()}.0badc0de.tmp"
    live.write_bytes(b"being written")
    found = {(row.kind, row.state) for row in garbage(project)}
    assert ("inversions", "interrupted before it was complete") in found
    assert any(kind == "edits" and "which is gone" in state for kind, state in found)  # its inversion is incomplete
    assert ("temp", "left by a process that died") in found
    assert not any(row.path == live for row in garbage(project))
    assert not any(row.kind == "tunes" for row in garbage(project))


def test_gc_leaves_an_entry_alone_while_a_tune_computes_it(tmp_path: Path) -> None:
    project = Project(tmp_path / "p.tav")
    entry = project.entry("tunes", {"latents": "x", "prompt": "a man", "steps": 1})
    collected: list[list[str]] = []

    def compute() -> None:
        (entry.path / "half-written").parent.mkdir(parents=True)
        (entry.path / "half-written").write_bytes(b"x")  # looks interrupted, but a live process holds it
        collected.append([f"{row.kind}/{row.key}" for row in garbage(project)])
        entry.save({"w": torch.ones(1)}, {})

    assert not project.produce(entry, compute, lock="checkpoints-run")  # a tune holds its run's lock too
    assert collected == [[]]


def test_newer_store_version_is_refused(tmp_path: Path) -> None:
    project, _ = _project(tmp_path)
    (project.root / "project.json").write_text(json.dumps({"store_version": STORE_VERSION + 1}))
    with pytest.raises(TavError, match="newer tav"):
        project.update_state(tune=None)


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    project = Project(tmp_path / "p.tav")
    holder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tavcli.store.project import Project\n"
        f"with Project(Path({str(project.root)!r})).lock('tunes-x'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        assert project.busy("tunes-x")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        process.kill()
    started = time.monotonic()
    with project.lock("tunes-x"):
        assert time.monotonic() - started < 5
    assert not project.busy("tunes-x")


def test_produce_computes_once_then_reports_cached(tmp_path: Path) -> None:
    project = Project(tmp_path / "p.tav")
    entry = project.entry("latents", {"clip_sha256": "abc"})
    calls: list[int] = []

    def compute() -> None:
        calls.append(1)
        entry.save({"mean": torch.zeros(1)}, {})

    assert project.produce(entry, compute) is False
    assert project.produce(entry, compute) is True
    assert project.produce(entry, compute, force=True) is False
    assert len(calls) == 2


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_ls_verify_rm_gc_on_a_real_project(tmp_path: Path, run_tav: RunTav) -> None:
    from .conftest import CLIP

    project = tmp_path / "ski.tav"
    small = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "2"]
    assert run_tav("tune", CLIP, "a man is skiing", *small, "-p", project)[0] == 0
    code, out, err = run_tav("edit", "a panda is skiing", "-p", project, "--steps", "2")
    assert code == 0, err
    edit = _records(out)[0]

    code, out, err = run_tav("ls", "-p", project, "--json")
    rows = {row["kind"]: row for row in _records(out)}
    assert set(rows) == {"latents", "embeddings", "tunes", "checkpoints", "inversions", "edits"}
    assert rows["edits"]["parent"] == f"inversions/{rows['inversions']['key']}"
    assert rows["tunes"]["current"] and rows["tunes"]["spec"]["steps"] == 2
    code, _, err = run_tav("ls", "-p", project)
    assert code == 0 and rows["edits"]["key"][:8] in err

    payload = project / "edits" / edit["key"] / "tensors.safetensors"
    payload.write_bytes(payload.read_bytes()[:-4] + b"oops")
    code, _, err = run_tav("verify", "-p", project)
    assert code == 1 and f"damaged edits/{edit['key']}" in err and "SHA-256" in err
    assert run_tav("ls", "-p", project)[0] == 0  # damage never breaks the listing

    tune_key = rows["tunes"]["key"]
    code, out, err = run_tav("rm", tune_key[:6], "-p", project, "--dry-run")
    assert code == 0 and out == "" and "would free" in err
    assert (project / "tunes" / tune_key).exists()
    code, out, err = run_tav("rm", tune_key[:6], "-p", project)  # stdin is no terminal: refuse to guess
    assert code == 1 and "--yes" in err and (project / "tunes" / tune_key).exists()
    code, out, err = run_tav("rm", tune_key[:6], "-p", project, "--yes")
    assert code == 0, err
    assert [r["removed"].split("/")[0] for r in _records(out)] == ["edits", "inversions", "tunes"]
    assert not Path(edit["path"]).exists() and not Path(edit["sidecar"]).exists()
    code, _, err = run_tav("edit", "a panda is skiing", "-p", project)
    assert code == 1 and "never tuned" in err

    (project / "inversions" / "0123456789abcdef").mkdir()  # as if a process died while inverting
    code, out, err = run_tav("gc", "-p", project, "--checkpoints", "--yes")
    assert code == 0, err
    assert {r["removed"].split("/")[0] for r in _records(out)} == {"inversions", "checkpoints"}
    remaining = {row["kind"] for row in _records(run_tav("ls", "-p", project, "--json")[1])}
    assert remaining == {"latents", "embeddings"}
    code, _, err = run_tav("rm", "ffff", "-p", project)
    assert code == 1 and "no entry match" in err


def test_local_model_identity_is_a_content_hash(tmp_path: Path) -> None:
    import shutil

    from tavcli.models.resolving import resolve_model

    from .conftest import TINY_SD

    model = tmp_path / "model"
    shutil.copytree(TINY_SD, model)
    first = resolve_model(str(model)).revision
    assert first.startswith("sha256-")
    os.utime(model / "unet" / "config.json", (0, 0))  # touched, not changed: same identity
    assert resolve_model(str(model)).revision == first
    copy = tmp_path / "elsewhere"
    shutil.copytree(model, copy)  # the same files elsewhere: same identity
    assert resolve_model(str(copy)).revision == first
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert resolve_model(str(model)).revision != first


def test_a_failed_first_write_leaves_no_entry_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from tavcli.store import entry as entry_module

    project = Project(tmp_path / "p.tav")
    inversion = project.entry("inversions", {"tune": "0" * 16, "steps": 2, "prompt": ""})

    def full_disk(path: Path, needed: int = 0) -> object:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(entry_module, "atomic_path", full_disk)
    with pytest.raises(OSError):
        inversion.save({"trajectory": torch.ones(2)}, {})
    assert not inversion.path.exists()  # `tav verify` finds nothing incomplete
    assert listing(project) == []
    monkeypatch.undo()
    inversion.save({"trajectory": torch.ones(2)}, {})  # an entry already there keeps its folder on failure
    monkeypatch.setattr(entry_module, "atomic_path", full_disk)
    with pytest.raises(OSError):
        inversion.save({"trajectory": torch.zeros(2)}, {})
    assert inversion.complete


def test_meta_that_is_not_json_says_so(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    tune = entries["tune"]
    (tune.path / "meta.json").write_text("{not json")
    with pytest.raises(TavError) as raised:
        tune.meta()
    assert "meta.json is not valid JSON (Expecting property name" in raised.value.message


def _null_text_edit(project: Project, inversion: Entry) -> tuple[Entry, Entry, Path]:
    """A null-text fit of `inversion`, an edit sampled with it, and the edit's render."""
    fit = project.entry("nulltexts", {"inversion": inversion.key, "guidance": 7.5, "iterations": 1})
    fit.save({"embeddings": torch.zeros(2)}, {})
    spec = {"inversion": inversion.key, "prompt": "a cat", "inversion_kind": "null-text", "null_text": fit.key}
    edit = project.entry("edits", spec)
    edit.save({"latents": torch.ones(2)}, {})
    render = project.root / "renders" / "a-cat.mp4"
    render.write_bytes(b"video")
    (project.root / "renders" / "a-cat.mp4.json").write_text(json.dumps({"edit": {"key": edit.key}}))
    return fit, edit, render


def test_an_edit_sampled_with_null_text_embeddings_is_computed_from_them(tmp_path: Path) -> None:
    project, entries = _project(tmp_path)
    fit, edit, render = _null_text_edit(project, entries["inversion"])
    rows = {(row.kind, row.key): row for row in listing(project)}
    assert rows[("edits", edit.key)].parent == f"nulltexts/{fit.key}"
    assert rows[("edits", entries["edit"].key)].parent == f"inversions/{entries['inversion'].key}"  # a plain edit
    plan = dependents(project, [rows[("inversions", entries["inversion"].key)]])
    assert [row.kind for row in plan] == ["edits", "edits", "nulltexts", "inversions"]  # children first
    plan = dependents(project, [rows[("nulltexts", fit.key)]])
    assert [(row.kind, row.key) for row in plan] == [("edits", edit.key), ("nulltexts", fit.key)]
    for row in plan:
        remove(project, row)
    assert not render.exists() and not render.with_name("a-cat.mp4.json").exists()
    assert (project.root / "renders" / "a-panda.mp4").exists() and entries["edit"].complete
    assert garbage(project) == []


def test_gc_collects_the_edits_of_a_null_text_fit_removed_behind_its_back(tmp_path: Path) -> None:
    import shutil

    project, entries = _project(tmp_path)
    fit, edit, render = _null_text_edit(project, entries["inversion"])
    shutil.rmtree(fit.path)
    found = garbage(project)
    assert [(row.kind, row.key, row.state) for row in found] == [
        ("edits", edit.key, f"computed from nulltexts/{fit.key}, which is gone")
    ]
    assert render in removal_files(project, found[0])  # its render goes with it


def _deep_checkpoint(root: Path) -> None:
    """A checkpoint whose safetensors header nests far deeper than the JSON parser can recurse."""
    header = b"[" * 100_000 + b"]" * 100_000
    folder = root / "checkpoints" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "step-00000001.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    ("damaged", "said"),
    [
        ("meta.json", "meta.json is not valid JSON (lists and objects nested more than 32 levels deep)"),
        ("project.json", "not JSON (lists and objects nested more than 32 levels deep)"),
        ("checkpoint", "its safetensors header is damaged"),
    ],
)
def test_deeply_nested_json_is_listed_verified_and_collected_as_damage(
    damaged: str, said: str, tmp_path: Path, run_tav: RunTav
) -> None:
    project, entries = _project(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    if damaged == "meta.json":
        (entries["edit"].path / "meta.json").write_text(deep)
        name = f"edits/{entries['edit'].key}"
    elif damaged == "project.json":
        (project.root / "project.json").write_text(deep)
        name = "project/project.json"
    else:
        _deep_checkpoint(project.root)
        name = "checkpoints/0123456789abcdef"
    code, out, err = run_tav("ls", "-p", project.root, "--json")
    assert code == 0 and "Traceback" not in err, err
    state = {f"{row['kind']}/{row['key']}": row["state"] for row in _records(out)}[name]
    assert state.startswith("damaged: ") and said in state
    code, out, err = run_tav("verify", "-p", project.root, "--json")
    assert code == 1 and "Traceback" not in err, err
    assert [row["kind"] + "/" + row["key"] for row in _records(out) if not row["ok"]] == [name]
    code, out, err = run_tav("gc", "-p", project.root, "--yes")
    assert code == 0 and "Traceback" not in err, err
    assert name in {row["removed"] for row in _records(out)}
    assert run_tav("verify", "-p", project.root)[0] == 0


def test_a_deeply_nested_hash_memo_is_ignored(tmp_path: Path) -> None:
    from tavcli.files.hashing import _hash_memo

    memo = tmp_path / "file-hashes.json"
    memo.write_text("{" + '"a": {' * 100_000 + "}" * 100_001)
    assert _hash_memo(memo) == {}  # a damaged memo only costs hashing again


def _entry_bytes(root: Path) -> int:
    """The bytes of the project's entries and renders (not `project.json` or lock files, which stay)."""
    files = [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts and p.name != "project.json"]
    return sum(p.stat().st_size for p in files)


def _tune_and_inversion(tmp_path: Path) -> tuple[Project, Entry, Entry]:
    """A project with latents, a tune on them and an inversion of that (no edits, no renders)."""
    project, entries = _project(tmp_path, with_edit=False)
    return project, entries["tune"], entries["inversion"]


def test_a_removal_plans_expected_freed_size_is_what_it_frees(tmp_path: Path) -> None:
    project, tune, inversion = _tune_and_inversion(tmp_path)
    plan = removal_plan(project, [tune.key[:6]])
    assert [(row.kind, row.key) for row in plan.rows] == [("inversions", inversion.key), ("tunes", tune.key)]
    before = _entry_bytes(project.root)
    removed: list[str] = []
    done = plan.execute(on_removed=lambda row: removed.append(f"{row.kind}/{row.key}"))
    assert [f"{row.kind}/{row.key}" for row in done] == removed == [f"inversions/{inversion.key}", f"tunes/{tune.key}"]
    assert plan.expected_freed_size == before - _entry_bytes(project.root) > 0
    assert not tune.path.exists() and not inversion.path.exists()
    assert project.state["tune"] is None and project.state["inversion"] is None


def test_a_removal_plan_whose_entry_came_into_use_is_refused(tmp_path: Path) -> None:
    project, tune, inversion = _tune_and_inversion(tmp_path)
    plan = removal_plan(project, [f"inversions/{inversion.key}"])
    with Project(project.root).using([inversion], doing="this edit"):
        refused = rf"^inversions/{inversion.key} is in use by a running tav command"
        with pytest.raises(TavError, match=refused) as raised:
            plan.execute()
        assert raised.value.hint == "run it again when that command has finished"
        assert inversion.complete and project.state["inversion"] == inversion.key
        with pytest.raises(TavError, match=rf"inversions/{inversion.key} is in use .*: nothing was removed \("):
            removal_plan(project, [inversion.key])  # `tav rm`'s own check, before anything is shown
    assert plan.execute() == list(plan.rows)
    assert not inversion.path.exists() and tune.complete
