"""Interrupting `tav` never loses finished work: killed tunes resume to the uninterrupted result,
longer tunes continue shorter ones, and concurrent processes compute each artifact once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "4", "--stride", "2", "--width", "64", "--height", "64"]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _delta(project: Path) -> dict:
    state = json.loads((project / "project.json").read_text())
    return load_file(project / "tunes" / state["tune"] / "tensors.safetensors")


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all((a[name] == b[name]).all() for name in a)


def _tav(*args: str | Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tavcli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: str, folder: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_tune_resumes_to_the_uninterrupted_result(sig: int, tmp_path: Path, run_tav: RunTav) -> None:
    steps = ["--steps", "60", "--checkpoint-every", "5"]
    code, _, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, *steps, "-p", tmp_path / "straight.tav")
    assert code == 0, err

    project = tmp_path / "killed.tav"
    process = _tav("tune", CLIP, "a man is skiing", *SMALL, *steps, "-p", project)
    _wait_for("checkpoints/*/step-*.safetensors", project, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert process.returncode == 130 and "interrupted at step" in err and "Traceback" not in err
    assert not list(project.glob("tunes/*/meta.json"))  # the tune is not done, nor pretends to be

    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, *steps, "-p", project)
    assert code == 0, err
    assert "resuming from step" in err
    assert [r["cached"] for r in _records(out)] == [True, False]  # the clip is not encoded again
    _assert_same(_delta(project), _delta(tmp_path / "straight.tav"))


@pytest.mark.slow
def test_more_steps_continue_a_finished_tune(tmp_path: Path, run_tav: RunTav) -> None:
    project, fresh = tmp_path / "p.tav", tmp_path / "fresh.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "3", "-p", project)[0] == 0
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "5", "-p", project)
    assert code == 0 and "resuming from step 3" in err
    assert _records(out)[-1]["cached"] is False
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "5", "-p", fresh)[0] == 0
    _assert_same(_delta(project), _delta(fresh))
    # Both tunes stay in the store; going back to 3 steps is a cache hit.
    code, out, _ = run_tav("tune", CLIP, "a man is skiing", *SMALL, "--steps", "3", "-p", project)
    assert _records(out)[-1]["cached"] is True
    assert len(list((project / "tunes").iterdir())) == 2


@pytest.mark.slow
def test_concurrent_processes_compute_each_artifact_once(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "shared.tav"
    args: list[str | Path] = ["tune", CLIP, "a man is skiing", *SMALL, "--steps", "10", "-p", project]
    processes = [_tav(*args) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    records = [record for out, _ in outputs for record in _records(out)]
    for kind in ("latents", "tune"):
        assert sorted(r["cached"] for r in records if r["kind"] == kind) == [False, True], records
    assert len({r["key"] for r in records if r["kind"] == "tune"}) == 1
    code, _, err = run_tav("verify", "-p", project)
    assert code == 0 and "damaged" not in err


@pytest.mark.slow
def test_killed_inversion_and_edit_leave_a_valid_store(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    tiny = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
    assert run_tav("tune", CLIP, "a man is skiing", *tiny, "-p", project)[0] == 0
    for command in (["invert", "--steps", "999"], ["edit", "a dog", "--steps", "999"]):
        before = len(list(project.glob("embeddings/*/meta.json")))
        process = _tav(*command, "-p", project)
        deadline = time.monotonic() + 120
        while len(list(project.glob("embeddings/*/meta.json"))) == before:  # its new prompt is encoded: it runs
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        time.sleep(1.0)
        assert process.poll() is None  # killed mid-way, not after
        process.kill()
        process.wait(timeout=30)
        code, _, err = run_tav("verify", "-p", project)
        assert code == 0, err  # whatever was half-done is not an entry
        code, out, err = run_tav("gc", "-p", project, "--yes")
        assert code == 0 and not list(project.rglob("*.tmp"))
    code, out, err = run_tav("edit", "a dog", "--steps", "2", "-p", project)
    assert code == 0 and _records(out)[0]["cached"] is False
