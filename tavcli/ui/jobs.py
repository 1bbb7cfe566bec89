"""The app's work queue: one worker thread per device runs one job at a time, in the order asked; the page polls
each job's progress (its task, steps, loss) and never waits on the work itself.

A job is a function of the worker's `Session`, which is made (and torch loaded) on the first job, then kept
so that later jobs reuse its loaded models. A job's reporter receives the workflow's notes and progress and
answers its stop request (a tune stops after its current step, its state saved, as at Ctrl-C). Jobs live in
the server's process: closing or reloading the page changes nothing, and reopening it shows them.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tavcli.errors import TavError, interruption
from tavcli.progress import Advance, Reporter

if TYPE_CHECKING:
    from tavcli.workflow.session import Session

__all__ = ["Job", "JobQueue", "JobReporter", "TaskView", "describe_failure"]

State = Literal["queued", "running", "done", "stopped", "failed"]
FINISHED: tuple[State, ...] = ("done", "stopped", "failed")


@dataclass
class TaskView:
    """The unit of work a job is in: 'tuning', 35 of 100 steps, started at a monotonic time."""

    description: str
    total: int
    completed: int
    first: int  # steps already done when it started (a resumed tune): not part of its rate
    started: float

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left at the rate so far, or None before the first step."""
        done = self.completed - self.first
        if done <= 0:
            return None
        return (now - self.started) / done * (self.total - self.completed)


@dataclass
class Job:
    """One piece of work the page asked for, and everything it has shown so far."""

    id: int
    kind: str  # "tune", "edit", ...
    title: str  # what the job list shows: `tune 'a man is skiing'`
    project: str
    work: Callable[[Session], list[Any]]
    state: State = "queued"
    notes: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    task: TaskView | None = None
    made: list[Any] = field(default_factory=list)  # the workflow's artifacts (a stopped tune's too)
    error: str | None = None
    asked: float = field(default_factory=time.time)
    seconds: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobReporter(Reporter):
    """What the workflow reports, kept on its job for the page to read; Stop is the job's stop event."""

    def __init__(self, job: Job, lock: threading.Lock) -> None:
        self.job, self.lock = job, lock

    def note(self, message: str) -> None:
        with self.lock:
            self.job.notes.append(message)

    @contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        view = TaskView(description, total, completed, completed, time.monotonic())
        with self.lock:
            self.job.task = view

        def advance(units: int = 1, **fields: Any) -> None:
            with self.lock:
                view.completed += units
                if description == "tuning" and "loss" in fields:
                    self.job.losses.append(float(fields["loss"]))

        yield advance

    def stop_requested(self) -> bool:
        return self.job.stop.is_set()


class JobQueue:
    """Jobs for one device, run one at a time in the order submitted by a worker thread of their own."""

    def __init__(self, make_session: Callable[[Reporter], Session], device: str = "auto") -> None:
        self.device = device
        self.lock = threading.Lock()
        self._make_session = make_session
        self._session: Session | None = None
        self._waiting: deque[Job] = deque()
        self._jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._wake = threading.Condition(self.lock)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"tav-jobs-{device}", daemon=True)
        self._thread.start()

    def submit(self, kind: str, title: str, project: str, work: Callable[[Session], list[Any]]) -> Job:
        """Queue `work`; it runs once every job asked before it has finished."""
        with self.lock:
            if self._closing:
                raise TavError("the app is shutting down: no new jobs")
            job = Job(next(self._ids), kind, title, project, work)
            self._jobs.append(job)
            self._waiting.append(job)
            self._wake.notify()
            return job

    def jobs(self) -> list[Job]:
        """Every job of this server's life, newest first."""
        with self.lock:
            return list(reversed(self._jobs))

    def get(self, job_id: int) -> Job | None:
        with self.lock:
            return next((job for job in self._jobs if job.id == job_id), None)

    def place(self, job: Job) -> int:
        """1 for the next job to run, 2 for the one after...; 0 once it runs or has finished."""
        with self.lock:
            return next((index for index, waiting in enumerate(self._waiting, start=1) if waiting is job), 0)

    def request_stop(self, job: Job) -> None:
        """Ask a running job to stop at its next safe point; a queued one is dropped before it starts."""
        with self.lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state, job.error = "stopped", "stopped before it started"
            job.stop.set()

    def close(self, timeout: float | None = None) -> None:
        """Take no more jobs, drop the queued ones, ask the running one to stop, and wait for it (a tune saves
        its state first)."""
        with self.lock:
            self._closing = True
            for job in self._waiting:
                job.state, job.error = "stopped", "the app shut down before it started"
            self._waiting.clear()
            for job in self._jobs:
                job.stop.set()
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                job.state = "running"
            self._execute(job)

    def _execute(self, job: Job) -> None:
        reporter = JobReporter(job, self.lock)
        started = time.monotonic()
        state: State = "done"
        try:
            if self._session is None:  # the first job loads torch: the page was up long before
                self._session = self._make_session(reporter)
            self._session.reporter = reporter
            made = job.work(self._session)
            with self.lock:
                job.made = list(made)
        except Exception as raised:
            state = "failed"
            with self.lock:
                job.error, stopped = describe_failure(raised)
                if stopped is not None:
                    state, job.made = "stopped", list(stopped)
        finally:
            with self.lock:
                job.state, job.seconds = state, time.monotonic() - started
                job.task = None


def describe_failure(raised: BaseException) -> tuple[str, Sequence[Any] | None]:
    """A failed job's one line (and, for a stopped tune, what it had made); a bug's traceback goes to the
    server's terminal, where `tav ui` runs, and the page names it in one line."""
    stopped = interruption(raised) if isinstance(raised, Exception) else None
    if stopped is not None:
        return stopped.message, list(getattr(stopped, "made", ()))
    if isinstance(raised, TavError):
        return raised.message + (f" ({raised.hint})" if raised.hint else ""), None
    if isinstance(raised, OSError):
        return str(raised), None
    if type(raised).__name__ == "OutOfMemoryError":
        return "the device ran out of memory (try fewer frames, a smaller size or gradient checkpointing)", None
    traceback.print_exception(raised, file=sys.stderr)
    return f"unexpected {type(raised).__name__}: {raised} (the traceback is in the terminal running `tav ui`)", None
