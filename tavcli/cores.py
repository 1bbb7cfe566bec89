"""Sharing the CPU with other busy processes: how PyTorch's OpenMP threads wait for each other.

PyTorch's CPU kernels run on OpenMP threads that spin at every barrier. On a machine whose cores are
all busy, a spinning thread waits for a partner that has no core, and a step can take several
times as long (on 2 cores: 2.3x beside one busy process, 2.85x for two tunes at once). With the
passive wait policy the threads sleep instead and the slowdown is what sharing the cores costs
(1.4-1.5x); on an idle machine, though, waking them makes small models up to 45% slower.

So when `tav` starts, before torch loads (libgomp reads the policy once, then), it chooses the
passive policy for this run if other processes keep the cores busy, or if another `tav` runs (two
started together are both still importing when they look, so the run queue cannot show them). The
thread count is left alone either way: it decides how sums are split, and so the results' last bits.
This module imports no torch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["choose_wait_policy", "other_tav_running", "runnable_elsewhere"]

SAMPLES = 5  # looks at the run queue, a few milliseconds apart: a passing `ls` is not a busy machine
INTERVAL = 0.005


def runnable_elsewhere() -> int | None:
    """Threads of other processes that are running or waiting for a core now (None: unknown here)."""
    try:
        stat = Path("/proc/stat").read_text()
        running = next(int(line.split()[1]) for line in stat.splitlines() if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    mine = 0
    for task in Path("/proc/self/task").glob("*"):
        try:
            mine += (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile is not running
    return max(0, running - mine)


def other_tav_running(processes: Path = Path("/proc")) -> bool:
    """Whether another `tav` runs on this machine: a Python process running the `tav` script or
    `-m tavcli`, other than this one and the processes it runs under (`time tav ...`), among the process
    folders of `processes` (the kernel's, or a test's own)."""
    mine = _ancestors()
    for folder in processes.glob("[0-9]*"):
        if int(folder.name) in mine:
            continue
        try:
            argv = [arg.decode(errors="replace") for arg in (folder / "cmdline").read_bytes().split(b"\0")[:3]]
        except OSError:
            continue
        if _runs_tav(argv):
            return True
    return False


def _runs_tav(argv: list[str]) -> bool:
    names = [Path(arg).name for arg in argv]
    if names and names[0] == "tav":
        return True
    return bool(names) and names[0].startswith("python") and (names[1:2] == ["tav"] or argv[1:3] == ["-m", "tavcli"])


def _ancestors() -> set[int]:
    """This process and its parents, up to the first process."""
    found, pid = set(), os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            pid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            break
    return found


def _threads() -> int:
    """The threads torch will start: OMP_NUM_THREADS (its first number, as in `4,2`), else every core."""
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(given) if given.isdigit() and int(given) > 0 else os.cpu_count() or 1


def choose_wait_policy() -> str | None:
    """Set `OMP_WAIT_POLICY=PASSIVE` for this process if other processes keep the cores busy or
    another `tav` runs.

    Does nothing when the user set the policy (or `TAV_WAIT_POLICY=off`), when torch is already
    loaded (too late), or where the run queue cannot be read. Returns the policy it chose, if any.
    """
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("TAV_WAIT_POLICY") == "off" or "torch" in sys.modules:
        return None
    cores, threads = os.cpu_count() or 1, _threads()
    busy = 0
    for sample in range(SAMPLES):
        others = runnable_elsewhere()
        if others is None:
            return None
        busy += others > 0 and others + threads > cores
        if sample < SAMPLES - 1:
            time.sleep(INTERVAL)
    if busy * 2 <= SAMPLES and not other_tav_running():
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
