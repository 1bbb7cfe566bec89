"""`tav batch`: validation before work, shared work done once, JSON records, and several processes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from tavcli.batch import assign, parse_jobs
from tavcli.errors import TavError

from .conftest import CLIP, RunTav, one_job

JOBS = """
[defaults]
model = "tiny"
frames = 4
width = 64
height = 64
steps = 3
edit = { steps = 2 }

[[job]]
name = "panda"
clip = "clip.mp4"
prompt = "a man is skiing"
edits = ["a panda is skiing"]

[[job]]
name = "sunset"
clip = "clip.mp4"
prompt = "a man is skiing"
edits = ["a man is skiing at sunset", "a panda is skiing"]

[[job]]
name = "other-tune"
clip = "clip.mp4"
prompt = "a person is skiing"
edits = ["a bear is skiing"]
edit = { steps = 2, guidance = 5.0 }
"""
FIELDS = ("job", "kind", "path", "key", "cached", "seconds", "error")


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    (tmp_path / "jobs.toml").write_text(JOBS)
    return tmp_path


@pytest.mark.slow
def test_three_jobs_share_work_and_a_second_run_computes_nothing(batch_dir: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("batch", batch_dir / "jobs.toml")
    assert code == 0, err
    records = _records(out)
    assert all(set(FIELDS) <= set(r) and r["error"] is None for r in records)
    computed = [(r["kind"], r["job"]) for r in records if not r["cached"]]
    # One clip encoding, two tunes (two prompts), two inversions, four distinct edits.
    assert sorted(kind for kind, _ in computed) == ["edit"] * 3 + ["inversion"] * 2 + ["latents"] + ["tune"] * 2
    assert [r["cached"] for r in records if r["job"] == "sunset" and r["kind"] == "tune"] == [True]
    assert err.count("loading model") == 1  # one base-model load for all jobs
    for record in records:
        assert Path(record["path"]).exists()

    code, out, err = run_tav("batch", batch_dir / "jobs.toml")
    assert code == 0 and "loading model" not in err
    again = _records(out)
    assert len(again) == len(records) and all(r["cached"] for r in again)

    code, out, err = run_tav("batch", batch_dir / "jobs.toml", "--dry-run")
    assert code == 0 and all(r["action"] == "reuse" for r in _records(out))


def test_invalid_jobs_stop_everything_and_name_job_and_field(batch_dir: Path, run_tav: RunTav) -> None:
    bad = JOBS.replace('name = "sunset"', 'name = "sunset"\nstpes = 3').replace("guidance = 5.0", 'guidance = "high"')
    (batch_dir / "bad.toml").write_text(bad)
    code, out, err = run_tav("batch", batch_dir / "bad.toml")
    assert code == 1 and out == ""
    assert "job 2 (sunset): unknown field 'stpes' (did you mean 'steps'?)" in err
    assert "job 3 (other-tune): field 'edit.guidance' must be a finite number from 0 to 100, not \"high\"" in err
    assert "2 of 3 jobs are invalid; nothing was run" in err
    assert not (batch_dir / "clip.tav").exists()


@pytest.mark.slow
def test_keep_going_runs_the_valid_jobs_and_fails_the_exit_status(batch_dir: Path, run_tav: RunTav) -> None:
    lines = [
        json.dumps(
            {
                "clip": "clip.mp4",
                "prompt": "a man is skiing",
                "model": "tiny",
                "frames": 4,
                "width": 64,
                "height": 64,
                "steps": 2,
            }
        ),
        json.dumps({"clip": "clip.mp4", "prompt": "a man", "frames": "four"}),
        json.dumps({"name": "missing", "clip": "nope.mp4", "prompt": "a man", "model": "tiny"}),
    ]
    (batch_dir / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_tav("batch", batch_dir / "jobs.jsonl", "--keep-going")
    assert code == 1
    records = _records(out)
    failed = {r["job"]: r["error"] for r in records if r["error"]}
    assert "line 2 (job-2): field 'frames' must be an integer" in failed["job-2"]
    assert "no such file" in failed["missing"]
    assert [r["kind"] for r in records if r["job"] == "job-1"] == ["latents", "tune"]


def test_jsonl_from_stdin_reports_syntax_errors_with_line_and_column(
    run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"clip": "a.mp4", "prompt": "x"}\n{"clip": "b.mp4",,}\n'))
    code, out, err = run_tav("batch", "-")
    assert code == 1 and out == ""
    assert "stdin line 2, column 18" in err and "Traceback" not in err


def test_toml_syntax_error_and_empty_file(tmp_path: Path, run_tav: RunTav) -> None:
    (tmp_path / "broken.toml").write_text('[[job]]\nclip = "a.mp4\n')
    code, _, err = run_tav("batch", tmp_path / "broken.toml")
    assert code == 1 and "line 2" in err and "fix the TOML syntax" in err
    (tmp_path / "empty.toml").write_text("")
    code, _, err = run_tav("batch", tmp_path / "empty.toml")
    assert code == 1 and "has no jobs" in err


def test_parsing_paths_names_and_tables(tmp_path: Path) -> None:
    text = (
        '[[job]]\nclip = "c.mp4"\nprompt = "p"\n[job.edit]\nformat = "gif"\n'
        '[[job]]\nname = "job-1"\nclip = "/abs.mp4"\nprompt = "p"\n'
    )
    jobs, problems = parse_jobs(text, "jobs.toml", tmp_path, jsonl=False)
    assert jobs[0].clip == tmp_path / "c.mp4" and jobs[0].edit == {"format": "gif"}
    assert [str(p) for p in problems] == [
        "jobs.toml job 2 (job-1): the name 'job-1' is used by an earlier job; names must be unique"
    ]
    with pytest.raises(TavError, match=r"\[defaults\] cannot set name"):
        parse_jobs('[defaults]\nname = "same"\n' + text, "jobs.toml", tmp_path, jsonl=False)


def test_assignment_keeps_tune_groups_together_and_covers_every_job(tmp_path: Path) -> None:
    lines = [json.dumps({"clip": f"c{i % 3}.mp4", "prompt": "p", "edits": ["e"] * i}) for i in range(7)]
    jobs, _ = parse_jobs("\n".join(lines), "jobs.jsonl", tmp_path, jsonl=True)
    shares = [assign(jobs, index, 2) for index in range(2)]
    assert sorted(j.name for share in shares for j in share) == sorted(j.name for j in jobs)
    groups = [{j.tune_group for j in share} for share in shares]
    assert not groups[0] & groups[1] and all(shares)


@pytest.mark.slow
def test_accelerate_launch_splits_jobs_over_two_processes(batch_dir: Path) -> None:
    """Two CPU processes (gloo) under `accelerate launch`: every artifact written once, same bytes as one process."""
    for name in ("one", "two"):
        (batch_dir / f"{name}.toml").write_text(
            JOBS.replace('model = "tiny"', f'model = "tiny"\nproject = "{name}.tav"')
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what accelerate gives each process: same rounding
    single = subprocess.run(
        [sys.executable, "-m", "tavcli", "batch", "one.toml"], cwd=batch_dir, env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "tavcli",
        "batch",
        "two.toml",
    ]
    multi = subprocess.run(launch, cwd=batch_dir, env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr
    assert "process 1 of 2" in multi.stderr and "process 2 of 2" in multi.stderr
    records = _records(multi.stdout)
    computed = [(r["kind"], r["key"]) for r in records if not r["cached"]]
    assert len(computed) == len(set(computed)) == 8  # nothing computed twice
    assert {r["key"] for r in records} == {r["key"] for r in _records(single.stdout)}
    for kind in ("tunes", "inversions", "edits"):
        for entry in (batch_dir / "one.tav" / kind).iterdir():
            twin = batch_dir / "two.tav" / kind / entry.name / "tensors.safetensors"
            assert twin.read_bytes() == (entry / "tensors.safetensors").read_bytes(), f"{kind}/{entry.name}"


@pytest.mark.slow
def test_batch_jobs_take_loras_and_controls(batch_dir: Path, tiny_lora: Path, run_tav: RunTav) -> None:
    """Every option of the commands is a job field: LoRAs for the tune, a ControlNet for the edits."""
    from diffusers import T2IAdapter

    from .test_control import _maps

    torch_seed = __import__("torch").manual_seed
    torch_seed(0)
    T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(
        batch_dir / "adapter"
    )
    _maps(batch_dir / "maps.mp4", 12, [255])
    job = {
        "clip": "clip.mp4",
        "prompt": "a man is skiing",
        "model": "tiny",
        "lora": [f"{tiny_lora}:0.5"],
        "frames": 3,
        "width": 64,
        "height": 64,
        "steps": 1,
        "edits": ["a dog is skiing"],
        "edit": {"steps": 1, "control": "scribble", "control_model": "adapter", "control_video": "maps.mp4"},
    }
    (batch_dir / "control.jsonl").write_text(json.dumps(job) + "\n")
    code, out, err = run_tav("batch", batch_dir / "control.jsonl")
    assert code == 0, err
    edit = [r for r in _records(out) if r["kind"] == "edit"][0]
    meta = json.loads((Path(edit["path"]).parent.parent / "edits" / edit["key"] / "meta.json").read_text())
    assert meta["spec"]["control"]["kind"] == "scribble"
    tune = [r for r in _records(out) if r["kind"] == "tune"][0]
    model = json.loads((Path(tune["path"]) / "meta.json").read_text())["model"]
    assert model["model"].endswith(f"|lora={tiny_lora}:0.5")


@pytest.mark.slow
def test_explicit_paths_are_honoured_and_records_are_absolute(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "jobs").mkdir()
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    small = {"model": "tiny", "frames": 2, "width": 32, "height": 32, "steps": 1, "edit": {"steps": 1}}
    jobs = [
        {"name": "up", "clip": "../clip.mp4", "prompt": "a man", "project": "../outside.tav", **small},
        {
            "name": "away",
            "clip": str(tmp_path / "clip.mp4"),
            "prompt": "a man",
            "edits": ["../../etc/passwd"],
            **small,
            "edit": {"steps": 1, "out": str(tmp_path / "elsewhere")},
        },
    ]
    (tmp_path / "jobs" / "j.jsonl").write_text("\n".join(map(json.dumps, jobs)) + "\n")
    monkeypatch.chdir(tmp_path / "jobs")
    code, out, err = run_tav("batch", "j.jsonl")
    assert code == 0, err
    records = _records(out)
    assert all(Path(r["path"]).is_absolute() for r in records)
    assert Path(records[0]["path"]).parent.parent == tmp_path / "outside.tav"  # relative to the batch file
    edit = next(r for r in records if r["kind"] == "edit")
    assert Path(edit["path"]).parent == tmp_path / "elsewhere" and Path(edit["path"]).name.startswith("etc-passwd-")

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({**jobs[0], "clip": "../clip.mp4"}) + "\n"))
    code, out, err = run_tav("batch", "-")  # from stdin, relative to the current folder
    assert code == 0, err
    assert all(Path(r["path"]).is_absolute() and r["cached"] for r in _records(out))


def test_root_confines_every_write_of_a_batch(tmp_path: Path, run_tav: RunTav) -> None:
    (tmp_path / "root").mkdir()
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    jobs = [
        {"name": "project", "clip": "clip.mp4", "prompt": "a man", "project": "/tmp/elsewhere.tav"},
        {"name": "out", "clip": "clip.mp4", "prompt": "a man", "project": "root/p.tav", "edit": {"out": "/tmp/x"}},
        {"name": "default", "clip": "clip.mp4", "prompt": "a man"},  # its project would be beside the clip
        {"name": "link", "clip": "clip.mp4", "prompt": "a man", "project": "root/link/p.tav"},
    ]
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    (tmp_path / "j.jsonl").write_text("\n".join(map(json.dumps, jobs)) + "\n")
    code, out, err = run_tav("batch", tmp_path / "j.jsonl", "--root", tmp_path / "root")
    assert code == 1 and out == ""
    assert "(project): field 'project' writes to /tmp/elsewhere.tav, outside --root" in err
    assert "(out): field 'edit.out' writes to /tmp/x, outside --root" in err
    assert "(default): field 'project' writes to" in err and "(link): field 'project'" in err
    assert "4 of 4 jobs are invalid" in err


def test_a_job_model_that_cannot_be_named_is_reported_at_validation(batch_dir: Path, run_tav: RunTav) -> None:
    bad = JOBS.replace('name = "sunset"', 'name = "sunset"\nrevision = "v1"')
    (batch_dir / "bad.toml").write_text(bad)
    code, out, err = run_tav("batch", batch_dir / "bad.toml")
    assert code == 1 and out == "" and "Traceback" not in err
    assert "job 2 (sunset): --revision only applies to hub models" in err
    assert "1 of 3 jobs are invalid; nothing was run" in err
    code, out, err = run_tav("batch", batch_dir / "bad.toml", "--keep-going", "--dry-run")
    assert code == 1  # a dry run fails as the run would
    records = _records(out)
    assert [r["job"] for r in records if r.get("error")] == ["sunset"]
    assert {r["job"] for r in records if "action" in r} == {"panda", "other-tune"}


def test_a_batch_job_stores_its_tune_in_the_precision_asked(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = {"clip": str(CLIP), "prompt": "a man", "project": str(tmp_path / "p.tav"), "model": "tiny", "frames": 2}
    job |= {"width": 32, "height": 32, "steps": 1, "save_precision": "bf16", "edits": ["a cat"], "edit": {"steps": 1}}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(job) + "\n"))
    code, out, err = run_tav("batch", "-")
    assert code == 0, err
    tune = next(r for r in _records(out) if r["kind"] == "tune")
    assert json.loads((Path(tune["path"]) / "meta.json").read_text())["spec"]["save_precision"] == "bf16"


@pytest.mark.slow
def test_batch_jobs_take_previews_low_rank_tunes_and_long_clip_edits(
    batch_dir: Path, tiny_lora: Path, run_tav: RunTav
) -> None:
    """Options as job fields: rank and previews for the tune; frames, window, a kept state and a LoRA for the
    edits."""
    shutil.copy(tiny_lora, batch_dir / "style.safetensors")
    job = {
        "clip": "clip.mp4",
        "prompt": "a man is skiing",
        "model": "tiny",
        "frames": 3,
        "width": 64,
        "height": 64,
        "steps": 2,
        "rank": 2,
        "preview": "a cat is skiing",
        "preview_every": 1,
        "preview_steps": 1,
        "edits": ["a dog is skiing"],
        "edit": {
            "steps": 1,
            "frames": "all",
            "stride": 6,
            "window": 3,
            "tune_step": 1,
            "lora": ["style.safetensors:0.5"],
        },
    }
    (batch_dir / "long.jsonl").write_text(json.dumps(job) + "\n")
    code, out, err = run_tav("batch", batch_dir / "long.jsonl")
    assert code == 0, err
    records = _records(out)
    tunes = [r for r in records if r["kind"] == "tune"]
    assert [t["steps"] for t in tunes] == [1, 2] and all(t["rank"] == 2 for t in tunes)
    assert [r["step"] for r in records if r["kind"] == "edit" and "step" in r] == [1, 2]
    assert any(r["kind"] == "preview" for r in records)
    edit = [r for r in records if r["kind"] == "edit" and "step" not in r][0]
    sidecar = json.loads(Path(edit["sidecar"]).read_text())
    assert sidecar["tune"]["key"] == tunes[0]["key"]  # the state kept at step 1
    assert sidecar["frames"]["edited"]["frames"] == 8 and sidecar["inversion"]["window"] == 3  # 48 frames, every 6th
    assert sidecar["loras"][0]["scale"] == 0.5
    bad = {**job, "edit": {"frames": "most"}}
    (batch_dir / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    code, _, err = run_tav("batch", batch_dir / "bad.jsonl")
    assert code == 1 and "edit.frames" in err and "or all" in err


@pytest.mark.slow
def test_a_dry_run_plans_the_null_text_fit_of_an_invert_only_job(tmp_path: Path, run_tav: RunTav) -> None:
    """The plan lists every entry the run computes, the fit an invert-only null-text job makes included."""
    invert = "{ inversion = 'null-text', null_iterations = 1 }"
    jobs = one_job(tmp_path, tmp_path / "p.tav", [], invert=invert, edit="{ steps = 2 }")
    code, out, err = run_tav("batch", jobs, "--dry-run")
    assert code == 0, err
    plan = _records(out)
    assert [(r["kind"], r["action"]) for r in plan] == [
        ("latents", "compute"),
        ("tune", "compute"),
        ("inversion", "compute"),
        ("null-text", "compute"),
    ]
    code, out, err = run_tav("batch", jobs)
    assert code == 0, err
    assert [(r["kind"], r["key"], r["cached"]) for r in _records(out)] == [(r["kind"], r["key"], False) for r in plan]
    code, out, err = run_tav("batch", jobs, "--dry-run")
    assert code == 0 and [(r["kind"], r["action"]) for r in _records(out)] == [(r["kind"], "reuse") for r in plan]


@pytest.mark.slow
def test_a_failure_while_making_the_edits_is_labelled_edit(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose outputs' folder became a file after validation fails at its edit step, and says so (the edit
    request is checked before its inversion is computed: nothing is inverted for edits that cannot be written)."""
    import tavcli.batch

    folder = tmp_path / "renders"
    jobs = one_job(tmp_path, tmp_path / "p.tav", ["a dog"], edit=f"{{ steps = 1, out = {json.dumps(str(folder))} }}")
    check = tavcli.batch.check_frames

    def check_then_take_the_folder(job: object) -> None:
        check(job)  # type: ignore[arg-type]
        folder.write_text("")

    monkeypatch.setattr(tavcli.batch, "check_frames", check_then_take_the_folder)
    code, out, err = run_tav("batch", jobs)
    assert code == 1
    records = _records(out)
    assert [r["kind"] for r in records] == ["latents", "tune", "edit"]
    assert records[-1]["error"] == f"--out {folder} is a file, not a folder"


@pytest.mark.slow
def test_the_current_tune_is_the_last_jobs_in_file_order_whichever_ran_last(tmp_path: Path, run_tav: RunTav) -> None:
    """Jobs run grouped by model (here the second job's first: its model's name sorts first); the project's
    current tune is still the one of the last job in the file."""
    from tavcli.models.tiny import tiny_model

    small = {"clip": str(CLIP), "prompt": "a man", "project": str(tmp_path / "p.tav"), "frames": 2, "steps": 1}
    small |= {"width": 32, "height": 32}
    jobs = [{"name": "first", "model": "tiny", **small}, {"name": "last", "model": str(tiny_model().folder), **small}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl")
    assert code == 0, err
    tunes = {r["job"]: r["key"] for r in _records(out) if r["kind"] == "tune"}
    assert [r["job"] for r in _records(out)][0] == "last" and tunes["first"] != tunes["last"]
    assert json.loads((tmp_path / "p.tav" / "project.json").read_text())["tune"] == tunes["last"]


def test_a_batch_job_keeps_its_clip_scorer_on_the_cpu_until_it_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval` put CLIP (CLIP-L: 1.7 GB) on the run's device before the tune, beside the UNet training; `tav tune
    --eval` keeps it on the CPU, and the tune moves it to the device only while it scores: a batch does the same."""
    from types import SimpleNamespace

    import torch

    from tavcli import workflow
    from tavcli.batch import run_jobs
    from tavcli.method import metrics
    from tavcli.progress import Reporter

    job = '[[job]]\nclip = "c.mp4"\nprompt = "a man"\npreview = "a dog"\neval = true\n'
    jobs, problems = parse_jobs(job, "jobs.toml", tmp_path, jsonl=False)
    assert not problems
    made: list[tuple[str, torch.device]] = []
    handed: list[object] = []

    class Scorer:
        def __init__(self, name: str, device: torch.device) -> None:
            made.append((name, device))

    def tune(session: object, request: object, force: bool, preview: object, scorer: object) -> list[object]:
        handed.append(scorer)
        return []

    monkeypatch.setattr(metrics, "ClipScorer", Scorer)
    monkeypatch.setattr(workflow, "tune", tune)
    monkeypatch.setattr(workflow, "with_model_defaults", lambda session, request, given: request)  # no model here
    gpu = torch.device("cuda", 0)  # never used: the tune is a stand-in
    session = SimpleNamespace(runtime=SimpleNamespace(device=gpu), reporter=Reporter(), release=lambda model: None)
    records: list[dict[str, object]] = []
    assert run_jobs(cast(Any, session), jobs, False, records.append), records
    assert [device for _, device in made] == [torch.device("cpu")] and isinstance(handed[0], Scorer)
