"""The GPU check comes back whole: two files in OUTDIR (an archive and a summary), budgets that fit the
deadline, a step that ran out of time or was skipped counted as not measured, spare steps run only in time
left over, and the SDXL steps run through the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
SUMMARY = ROOT / "benchmarks" / "check_summary.py"


def _plan(*flags: str, seconds: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"TAV_CHECK_SECONDS": str(seconds)} if seconds else {})}
    return subprocess.run(["bash", str(CHECK), "--plan", *flags], capture_output=True, text=True, env=env)


def _budgets(listing: str, kind: str) -> dict[str, int]:
    """The plan's steps of one kind ("in all": planned, "spare") and their budgets, in the listed order."""
    return {m[1]: int(m[2]) for m in re.finditer(rf"^(\w+)\s+(\d+)s\s+\(.*{kind}", listing, re.MULTILINE)}


def _archived(archive: Path, name: str) -> dict[str, Any]:
    """A JSON file in the check's archive."""
    with tarfile.open(archive) as opened:
        member = opened.extractfile(name)
        assert member is not None, name
        found: dict[str, Any] = json.load(member)
    return found


def test_the_plan_lists_every_step_in_order_of_value_and_its_budgets_fit_the_deadline() -> None:
    done = _plan()
    assert done.returncode == 0, done.stdout + done.stderr
    planned, spare = _budgets(done.stdout, "in all"), _budgets(done.stdout, "spare")
    assert list(planned) == [
        "environment", "model", "bench_tune", "bench_sampling", "bench_inversion", "bench_tune_checkpointing",
        "tune_dry_run", "tune", "invert", "edit_batch_1", "sdxl_model", "sdxl_tune", "sdxl_invert", "sdxl_edit",
    ]  # fmt: skip
    assert list(spare) == ["edit_batch_2", "bench_fp16", "bench_compile"]  # after them, in the time they leave
    deadline = int(re.search(r"of the (\d+)s deadline", done.stdout)[1])  # type: ignore[index]
    assert sum(planned.values()) <= deadline  # before: about 1,170 s of limits against 540
    assert "bench_compile" not in _plan("--smoke").stdout  # compiling on a CPU takes minutes
    assert _plan(seconds=300).returncode == 1  # a deadline the budgets overrun is said, not discovered on the device


def test_a_check_out_of_time_brings_back_one_archive_and_a_summary_and_counts_skipped_steps_as_unmeasured(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "TAV_PYTHON": sys.executable, "TAV_CHECK_SECONDS": "12", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(CHECK), "--smoke", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr  # before: "0 failed", exit 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]  # before: about 20 files
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^environment\s+measured", summary, re.MULTILINE)
    assert re.search(r"^sdxl_edit\s+skipped: no time left", summary, re.MULTILINE)
    assert re.search(r"^bench_fp16\s+skipped: no spare time", summary, re.MULTILINE)
    measured, planned = map(int, re.search(r"(\d+) of (\d+) steps measured", summary).groups())  # type: ignore[union-attr]
    assert 1 <= measured < planned == 14  # the spare steps, skipped, are not counted
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        names = archive.getnames()
    assert "check/steps.jsonl" in names and "check/environment.json" in names and "check/summary.txt" in names
    assert not any("work" in name for name in names)  # models and projects stay in the scratch folder
    assert not list(tmp_path.glob("tav-gpu-check.*"))  # and the scratch folder is gone


def test_a_step_cut_by_its_time_limit_or_failed_is_not_measured(tmp_path: Path) -> None:
    steps = [
        {"step": "environment", "exit": 0, "seconds": 3, "limit": 25},
        {"step": "bench_tune", "exit": 124, "seconds": 40, "limit": 40},
        {"step": "tune", "exit": 1, "seconds": 9, "limit": 85},
        {"step": "invert", "exit": None, "budget": 35, "skipped": "no time left"},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    (tmp_path / "environment.json").write_text(json.dumps({"device": "NVIDIA H200", "compute_capability": "9.0"}))
    (tmp_path / "tune.log").write_text("...\nerror: CUDA out of memory\n")
    (tmp_path / "bench_tune.json").write_text(json.dumps({"tune_step_s": 0.31, "tune_peak_memory_gb": 44.1}))
    done = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("NVIDIA H200 (compute capability 9.0)")
    assert re.search(r"^bench_tune\s+timed out", done.stdout, re.MULTILINE)
    assert "tune_step_s = 0.31" in done.stdout  # what a cut step had written still shows
    assert re.search(r"^tune\s+failed \(exit 1\)", done.stdout, re.MULTILINE)
    assert "last log line: error: CUDA out of memory" in done.stdout
    assert re.search(r"^invert\s+skipped: no time left", done.stdout, re.MULTILINE)
    assert lines[-1] == "1 of 4 steps measured"


def test_a_spare_step_counts_only_when_it_ran_and_a_check_of_no_steps_is_no_check(tmp_path: Path) -> None:
    steps = [
        {"step": "sdxl_edit", "exit": 0, "seconds": 30, "limit": 34},
        {"step": "edit_batch_2", "exit": 0, "seconds": 46, "limit": 50},  # a spare step in the time left: counted
        {"step": "bench_fp16", "exit": None, "budget": 45, "skipped": "no spare time", "spare": True},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    done = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert re.search(r"^bench_fp16\s+skipped: no spare time", done.stdout, re.MULTILINE)
    assert done.stdout.splitlines()[-1] == "2 of 2 steps measured"
    (tmp_path / "steps.jsonl").write_text("")  # TAV_CHECK_STEPS named no step
    done = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout.splitlines()[-1] == "0 of 0 steps measured"


def test_the_sdxl_steps_tune_invert_and_edit_their_own_sdxl_folder_through_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps = ["sdxl_model", "sdxl_tune", "sdxl_invert", "sdxl_edit"]  # alone: the SD 1.5 steps take minutes
    env = {**os.environ, "TAV_PYTHON": sys.executable, "TAV_CHECK_STEPS": " ".join(steps), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(CHECK), "--smoke", str(out)], capture_output=True, text=True, env=env)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr
    assert summary.splitlines()[-1] == "4 of 4 steps measured"
    found = {name: _archived(out / "gpu-check.tar.gz", f"check/{name}.json") for name in steps[1:]}
    tune = found["sdxl_tune"]["command"]
    assert Path(tune[tune.index("--model") + 1]).name == "sdxl-narrow"  # the folder sdxl_model built
    assert tune[tune.index("--frames") + 1 :][:5] == ["2", "--width", "64", "--height", "64"]
    assert "--gradient-checkpointing" in tune and found["sdxl_tune"]["tune_steps_per_second"] > 0
    assert [r["kind"] for r in found["sdxl_invert"]["records"]] == ["inversion"]
    assert [r["kind"] for r in found["sdxl_edit"]["records"]] == ["edit"]  # from that inversion, same steps
    assert not list(tmp_path.glob("tav-gpu-check.*"))  # its 13.9 GB folder, on a GPU, goes with the scratch folder
