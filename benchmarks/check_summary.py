"""The GPU check's summary: one line per step (measured, failed, timed out or skipped) and its main figures.

    python benchmarks/check_summary.py LOGDIR > summary.txt

LOGDIR is what `benchmarks/gpu_check.sh` archives: `steps.jsonl` (one line per step: its exit
status, seconds and budget, or why it was skipped) and each step's JSON and log. A step counts as measured
only when it ran to the end with exit status 0: a step cut by its time limit (124, 137) or skipped for lack
of time is not measured, and the last line says how many were. A spare step (`"spare": true`: run only in
time the planned steps left) counts only when it ran: skipped, it is listed but not counted.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

# The figures worth a glance in each step's JSON (all of them stay in the archive).
FIGURE_SUFFIXES = ("_s", "_gb", "_tflops", "_peak_fraction", "_per_second", "_per_minute_1", "_4_batched")


def main() -> int:
    logs = Path(sys.argv[1])
    steps = [json.loads(line) for line in (logs / "steps.jsonl").read_text().splitlines() if line.strip()]
    environment = _read(logs / "environment.json")
    print(_environment_line(environment))
    measured = counted = 0
    for step in steps:
        status = _status(step)
        measured += status == "measured"
        counted += not (step.get("spare") and step.get("skipped"))
        timing = f"{step['seconds']}s of {step['limit']}s" if "seconds" in step else f"budget {step.get('budget')}s"
        print(f"{step['step']:<26} {status:<22} {timing}")
        for name, value in _figures(logs, step).items():
            print(f"    {name} = {value}")
        if status.startswith(("failed", "timed out")):
            print(f"    last log line: {_last_line(logs / (step['step'] + '.log'))}")
    print(f"{measured} of {counted} steps measured")
    return 0 if 0 < counted == measured else 1  # none at all (a TAV_CHECK_STEPS that names none) is no check


def _status(step: dict[str, Any]) -> str:
    """measured, or why not: a time limit (124 from timeout, 137 when it had to kill), a failure, a skip."""
    if step.get("skipped"):
        return f"skipped: {step['skipped']}"
    if step["exit"] == 0:
        return "measured"
    return "timed out" if step["exit"] in (124, 137) else f"failed (exit {step['exit']})"


def _figures(logs: Path, step: dict[str, Any]) -> dict[str, Any]:
    """The step's headline numbers: flat numeric fields of its JSON whose names say what they measure."""
    found = _read(logs / f"{step['step']}.json")
    return {
        name: value
        for name, value in found.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and name.endswith(FIGURE_SUFFIXES)
    }


def _environment_line(found: dict[str, Any]) -> str:
    if not found:
        return "environment: not recorded"
    versions = " ".join(f"{name} {found.get(name)}" for name in ("torch", "diffusers", "transformers", "typer"))
    capability = f" (compute capability {found['compute_capability']})" if "compute_capability" in found else ""
    return f"{found.get('device')}{capability}; {versions}"


def _read(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        value = json.loads(path.read_text())
        if isinstance(value, dict):
            return value
    return {}


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else "(empty)"
    return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
