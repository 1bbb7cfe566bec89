"""The processes of one batch (under `accelerate launch`, one per device): each one's share of the jobs, and how
the batch ends.

A launcher stops every process as soon as one exits with an error, so no process leaves before all have run
their share: they gather what each one's records said, then the main process settles each project's current
tune as a single process would leave it (the last job in file order whose tune finished) and speaks for the
batch. Torch is imported only when there are several processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from tavcli.batch.jobs import Job
from tavcli.batch.running import Emit

__all__ = ["Slot", "Tally", "assign", "batch_slot", "finish", "process_slot", "settle_current_tunes"]

# How long a process that ran its share waits for the others: as long as the longest share takes.
NO_LIMIT = timedelta(days=365)


@dataclass(frozen=True)
class Slot:
    """This process among the batch's: its index, how many there are, its device, and the group the ends of
    their shares are gathered over (None for a single process)."""

    index: int
    count: int
    device: str
    group: Any = None


def process_slot(device: str) -> Slot:
    """This process's slot: under `accelerate launch`, one device per process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Slot(0, 1, device)
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    chosen = device if device not in ("auto", "cuda") or state.device.type != "cuda" else str(state.device)
    # Made now, while every process is here; gloo waits on a socket, not on the device, for however long.
    group = dist.new_group(backend="gloo", timeout=NO_LIMIT)
    return Slot(state.process_index, state.num_processes, "cpu" if state.device.type == "cpu" else chosen, group)


@contextmanager
def batch_slot(device: str) -> Iterator[Slot]:
    """This process's slot for the block, and every process group ended after it, however the block ends (done,
    failed, interrupted; or the slot itself not made): NCCL warns at exit of a group never destroyed, and may
    hang there."""
    try:
        yield process_slot(device)
    finally:
        end_process_groups()


def end_process_groups() -> None:
    """Destroy torch's process groups if any were made (by the slot, or in one process before it)."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group, and no torch to load for it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group: nothing else is sent


def assign(jobs: list[Job], process: int, processes: int) -> list[Job]:
    """This process's share of the jobs: whole tune groups, balanced by edit count, the same on every process."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.tune_group, []).append(job)
    loads = [0] * processes
    owner: dict[str, int] = {}
    for group, members in sorted(groups.items(), key=lambda item: -sum(1 + len(j.edits) for j in item[1])):
        owner[group] = loads.index(min(loads))
        loads[owner[group]] += sum(1 + len(job.edits) for job in members)
    return [job for job in jobs if owner[job.tune_group] == process]


@dataclass
class Tally:
    """Records on their way out, and what they say: the jobs that failed, and each job's finished tune (the one
    its run made current; a preview's kept states are not)."""

    emit: Emit
    failed: list[str] = field(default_factory=list)
    tunes: dict[str, str] = field(default_factory=dict)

    def __call__(self, record: dict[str, Any]) -> None:
        self.emit(record)
        if record.get("error") is not None:
            self.failed.append(record["job"])
        elif record["kind"] == "tune" and "action" not in record and not record.get("kept"):  # no plan's row
            self.tunes[record["job"]] = record["key"]


def finish(slot: Slot, tally: Tally) -> Tally:
    """The whole batch's tally, once every process has run its share (each waits here for the others). The
    groups are ended by `batch_slot`."""
    if slot.group is None:
        return tally
    import torch.distributed as dist

    shares: list[Any] = [None] * slot.count
    dist.all_gather_object(shares, (tally.failed, tally.tunes), group=slot.group)
    whole = Tally(tally.emit)
    for failed, tunes in shares:
        whole.failed += failed
        whole.tunes.update(tunes)
    return whole


def settle_current_tunes(session: Any, jobs: list[Job], tunes: dict[str, str]) -> None:
    """Make each project's current tune that of its last job in file order whose tune finished: what one process
    running the jobs in file order leaves, whichever order the jobs ran in, on however many processes."""
    last: dict[Path, str] = {}
    for job in jobs:
        if job.name in tunes:
            last[job.project] = tunes[job.name]
    for root, key in last.items():
        project = session.project(root)
        if project.state.get("tune") != key:
            project.update_state(tune=key, inversion=None)  # its inversion pointer was another tune's
