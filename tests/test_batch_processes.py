"""`tav batch` under `accelerate launch` (two CPU processes over gloo): a failed job stops no other process's
jobs and the launch exits with a status, and the project's current tune is the one a single process leaves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CLIP, RunTav, one_job

SMALL = {"frames": 2, "width": 32, "height": 32, "edit": {"steps": 1}}


def _write(folder: Path, name: str, jobs: list[dict[str, object]]) -> Path:
    (folder / name).write_text("".join(json.dumps({"clip": str(CLIP), **SMALL, **job}) + "\n" for job in jobs))
    return folder / name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # what accelerate gives each process


@pytest.fixture(autouse=True)
def tiny_built() -> None:
    """The tiny model built here first: no launched process builds it (nor is stopped while it does)."""
    from tavcli.models.tiny import tiny_model

    tiny_model()


def _launch(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`accelerate launch` of `tav batch ARGS` on two CPU processes, quiet about its own stack."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "tavcli", "batch", *args]
    return subprocess.run(launch, cwd=folder, env=_env(), capture_output=True, text=True, timeout=300)


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_a_failed_job_lets_the_other_process_finish_and_the_launch_exits_1(tmp_path: Path) -> None:
    jobs = [  # one job per process: the first fails at once, the second is still tuning then
        {"name": "bad", "prompt": "a man", "model": "nobody/nothing", "steps": 1},
        {"name": "good", "prompt": "a man", "model": "tiny", "steps": 40, "project": str(tmp_path / "p.tav")},
    ]
    launched = _launch(tmp_path, str(_write(tmp_path, "jobs.jsonl", jobs)), "--keep-going")
    assert launched.returncode == 1, launched.stderr
    records = _records(launched.stdout)
    assert [(r["job"], r["kind"], r["error"] is None) for r in records if r["job"] == "good"] == [
        ("good", "latents", True),
        ("good", "tune", True),
    ]
    assert "interrupted" not in launched.stderr and "Traceback" not in launched.stderr
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 of 2 jobs failed (their records on stdout say why)"], launched.stderr


@pytest.mark.slow
def test_two_processes_leave_the_current_tune_a_single_process_leaves(tmp_path: Path) -> None:
    """The last job in file order gives its project's current tune, whichever process finishes last."""
    for name in ("one", "two"):
        project = str(tmp_path / f"{name}.tav")
        jobs = [  # two tunes of one project, one per process: the first job's takes longest
            {"name": "long", "prompt": "a man", "model": "tiny", "steps": 40, "project": project},
            {"name": "short", "prompt": "a man", "model": "tiny", "steps": 1, "project": project},
        ]
        _write(tmp_path, f"{name}.jsonl", jobs)
    single = subprocess.run(
        [sys.executable, "-m", "tavcli", "batch", "one.jsonl"], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    launched = _launch(tmp_path, "two.jsonl")
    assert launched.returncode == 0, launched.stderr
    short = next(r["key"] for r in _records(single.stdout) if r["job"] == "short" and r["kind"] == "tune")
    for name in ("one", "two"):
        assert json.loads((tmp_path / f"{name}.tav" / "project.json").read_text())["tune"] == short, name


class _FakeGroups:
    """torch.distributed as a batch uses it, in one process: groups made, gathered over, destroyed."""

    def __init__(self, initialised: bool) -> None:
        self.initialised, self.destroyed = initialised, 0

    def install(self, monkeypatch: pytest.MonkeyPatch, processes: int) -> None:
        import accelerate
        import torch
        import torch.distributed as dist

        groups = self

        class PartialState:  # what `accelerate launch` starts: the default group made
            def __init__(self, cpu: bool = False) -> None:
                groups.initialised = True
                self.process_index, self.num_processes, self.device = 0, processes, torch.device("cpu")

        def all_gather_object(shares: list[object], share: object, group: object = None) -> None:
            shares[:] = [share] * len(shares)

        def destroy_process_group(group: object = None) -> None:
            assert groups.initialised, "destroyed twice"
            groups.initialised, groups.destroyed = False, groups.destroyed + 1

        monkeypatch.setattr(accelerate, "PartialState", PartialState)
        monkeypatch.setattr(dist, "is_initialized", lambda: groups.initialised)
        monkeypatch.setattr(dist, "new_group", lambda **kwargs: "gloo")
        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
        monkeypatch.setattr(dist, "destroy_process_group", destroy_process_group)


@pytest.mark.parametrize(
    ("processes", "initialised", "ending"),
    [
        (2, False, "done"),
        (2, False, "interrupted"),
        (2, False, "failed"),
        (2, False, "no slot"),  # the default group made, then the batch's own refused
        (1, True, "done"),
        (1, True, "failed"),
    ],
)
def test_the_process_group_is_destroyed_however_the_batch_ends(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch, processes: int, initialised: bool, ending: str
) -> None:
    """The group was destroyed only after a batch that ran to its end over several processes: not when a run was
    interrupted or failed on the way, nor in one process whose group was made before (NCCL warns at exit of a
    group never destroyed, and may hang there). Every way out destroys it, once."""
    import tavcli.batch

    groups = _FakeGroups(initialised)
    groups.install(monkeypatch, processes)
    monkeypatch.setenv("WORLD_SIZE", str(processes))

    def run_jobs(*args: object) -> bool:
        if ending == "interrupted":
            raise KeyboardInterrupt
        if ending == "failed":
            raise OSError(28, "No space left on device")
        return True

    def refused(**kwargs: object) -> None:
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(tavcli.batch, "run_jobs", run_jobs)
    if ending == "no slot":
        monkeypatch.setattr("torch.distributed.new_group", refused)
    code, _, err = run_tav("batch", one_job(tmp_path, tmp_path / "p.tav", []))
    assert code == {"done": 0, "interrupted": 130, "failed": 1, "no slot": 1}[ending], err
    assert groups.destroyed == 1 and not groups.initialised
