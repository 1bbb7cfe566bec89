"""Run one `tav` command in this process and write its wall time and peak memory as JSON (gpu_check.sh's timer).

    python benchmarks/measured.py RESULT.json tune clip.mp4 "a man is skiing" --steps 500 ...

Peak memory: `torch.cuda.max_memory_allocated` (and `max_memory_reserved`, what the caching allocator held)
when CUDA was used, else the process's peak RSS. The command's JSON records (what `tav` prints on stdout) are
kept, with a tune's steps per second and a `--dry-run`'s estimated peak taken from them. The result is
written even when the command fails (with its exit status), so a timed-out step leaves nothing half-written
and a failed one says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    result, args = Path(sys.argv[1]), sys.argv[2:]
    started = time.perf_counter()
    status = 0
    sys.argv = ["tav", *args]
    printed = io.StringIO()
    try:
        from tavcli.cli import main as tav

        with contextlib.redirect_stdout(printed):
            tav()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    sys.stdout.write(printed.getvalue())
    record: dict[str, Any] = {"command": ["tav", *args], "exit": status}
    record["seconds"] = round(time.perf_counter() - started, 2)
    record["records"] = _records(printed.getvalue())
    for tuned in (r for r in record["records"] if r.get("kind") == "tune" and not r.get("cached")):
        record["tune_steps_per_second"] = round(tuned["steps"] / tuned["seconds"], 3)  # load and saving included
    for plan in (r for r in record["records"] if r.get("kind") == "plan" and "memory" in r):
        record["estimated_peak_gb"] = round(plan["memory"]["peak_bytes"] / 1e9, 3)  # the pre-flight's, to compare
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        record["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
        record["memory"] = "cuda max_memory_allocated"
    else:
        record["peak_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
        record["memory"] = "process peak RSS"
    temp = result.with_suffix(".tmp")
    temp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temp, result)
    return status


def _records(printed: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines a command printed."""
    found = []
    for line in printed.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                found.append(value)
    return found


if __name__ == "__main__":
    sys.exit(main())
