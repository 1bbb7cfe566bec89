"""Run one `tav` command in this process and write its wall time and peak memory as JSON (gpu_check.sh's timer).

    python benchmarks/measured.py RESULT.json tune clip.mp4 "a man is skiing" --steps 500 ...

Peak memory: `torch.cuda.max_memory_allocated` when CUDA was used, else the process's peak RSS. The
result is written even when the command fails (with its exit status), so a timed-out step leaves nothing
half-written and a failed one says so.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    result, args = Path(sys.argv[1]), sys.argv[2:]
    started = time.perf_counter()
    status = 0
    sys.argv = ["tav", *args]
    try:
        from tavcli.cli import main as tav

        tav()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    record = {"command": ["tav", *args], "exit": status, "seconds": round(time.perf_counter() - started, 2)}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        record["memory"] = "cuda max_memory_allocated"
    else:
        record["peak_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
        record["memory"] = "process peak RSS"
    temp = result.with_suffix(".tmp")
    temp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temp, result)
    return status


if __name__ == "__main__":
    sys.exit(main())
