"""The store under concurrent use: a second identical edit reuses the first one's entry and render, and
`tav rm` never pulls an entry from under a command that uses it.

Two commands run at once as two threads of this process, each with its own session: the store's locks
are OS file locks, which exclude each other across threads as across processes. Each command is paused
at a chosen point with an event, so the interleaving is the same on every run.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tavcli.errors import TavError
from tavcli.progress import Reporter
from tavcli.store.project import Project

from .conftest import CLIP, RunTav, tav_ok

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
PATIENCE = 120  # seconds a paused command waits for the other before the test gives up


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("concurrency") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "-p", project)
    tav_ok("invert", "-p", project, "--steps", "2")
    return project


class Notes(Reporter):
    """A reporter that keeps its notes and sets `waiting` when told that a lock is busy."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.waiting = threading.Event()

    def note(self, message: str) -> None:
        self.notes.append(message)
        if message.startswith("waiting for another tav process"):
            self.waiting.set()


class Command(threading.Thread):
    """A workflow call in a thread of its own, with its own session; keeps what it returned or raised."""

    def __init__(self, name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(name=name, daemon=True)
        from tavcli.runtime import resolve_runtime
        from tavcli.workflow.session import Session

        self.reporter = Notes()
        self.session = Session(resolve_runtime("cpu", "fp32"), self.reporter)
        self.call, self.args, self.kwargs = call, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call(self.session, *self.args, **self.kwargs)
        except BaseException as error:  # handed to the test
            self.error = error

    def finish(self) -> Any:
        self.join(PATIENCE)
        assert not self.is_alive(), f"{self.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _in(name: str) -> bool:
    return threading.current_thread().name == name


def _pause(
    monkeypatch: pytest.MonkeyPatch, module: Any, attribute: str, thread: str, until: threading.Event
) -> threading.Event:
    """Make `module.attribute` wait for `until` when thread `thread` calls it; return the event set when it does."""
    reached = threading.Event()
    real = getattr(module, attribute)

    def paused(*args: Any, **kwargs: Any) -> Any:
        if _in(thread):
            reached.set()
            assert until.wait(PATIENCE), f"{attribute} waited in vain"
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attribute, paused)
    return reached


def _edit_request(project: Path, prompt: str) -> Any:
    from tavcli.settings.editing import EditRequest
    from tavcli.settings.sampling import EditSettings

    return EditRequest(project=project, prompts=[prompt], settings=EditSettings(steps=2))


def _edit(session: Any, request: Any) -> Any:
    from tavcli.workflow.editing import edit

    return edit(session, request)


def _current_inversion(project: Path) -> str:
    return str(json.loads((project / "project.json").read_text())["inversion"])


def test_a_second_identical_edit_waits_then_reuses_the_entry_and_the_render(
    tuned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tavcli.media import video
    from tavcli.workflow import editing, rendering

    request = _edit_request(tuned, "a dog is skiing at once")
    second = Command("second", _edit, request)
    sampling = _pause(monkeypatch, editing, "ddim_sample", "first", second.reporter.waiting)
    checked = threading.Event()  # the second edit looked for a finished output
    looked_up, written = rendering._rendered, video.write_video  # the function rendering imported
    writers: list[str] = []

    def rendered(*args: Any) -> bool:
        found = looked_up(*args)
        if _in("second"):
            checked.set()
        return found

    def write_video(*args: Any, **kwargs: Any) -> Any:
        writers.append(threading.current_thread().name)
        if _in("first"):
            checked.wait(2)  # had the second edit not waited for this render, it would have looked by now
        return written(*args, **kwargs)

    monkeypatch.setattr(rendering, "_rendered", rendered)
    monkeypatch.setattr(rendering, "write_video", write_video)
    first = Command("first", _edit, request)
    first.start()
    assert sampling.wait(PATIENCE)  # the first edit holds its entry's lock
    second.start()
    [made], [found] = first.finish(), second.finish()
    assert made.cached is False and found.cached is True
    assert found.key == made.key and found.path == made.path and writers == ["first"]


def test_rm_refuses_an_inversion_a_running_edit_uses(
    tuned: Path, monkeypatch: pytest.MonkeyPatch, run_tav: RunTav
) -> None:
    from tavcli.workflow import editing

    go_on = threading.Event()
    sampling = _pause(monkeypatch, editing, "ddim_sample", "edit", go_on)
    running = Command("edit", _edit, _edit_request(tuned, "a cat is skiing meanwhile"))
    running.start()
    assert sampling.wait(PATIENCE)
    inversion = _current_inversion(tuned)
    try:
        code, out, err = run_tav("rm", f"inversions/{inversion}", "-p", tuned, "--yes")
    finally:
        go_on.set()
    [made] = running.finish()
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"inversions/{inversion} is in use by a running tav command" in err and "nothing was removed" in err
    assert (tuned / "inversions" / inversion / "meta.json").is_file()
    spec = json.loads((tuned / "edits" / made.key / "meta.json").read_text())["spec"]
    assert spec["inversion"] == inversion and made.path.is_file()


def test_an_edit_whose_inversion_was_removed_before_it_sampled_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_tav: RunTav
) -> None:
    from tavcli.workflow import editing

    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    assert run_tav("invert", "-p", project, "--steps", "2")[0] == 0
    inversion = _current_inversion(project)
    go_on = threading.Event()
    planned = _pause(monkeypatch, editing, "run_plan", "edit", go_on)  # planned, not yet sampling
    running = Command("edit", _edit, _edit_request(project, "a cat is skiing"))
    running.start()
    assert planned.wait(PATIENCE)
    try:
        code, _, err = run_tav("rm", f"inversions/{inversion}", "-p", project, "--yes")
        assert code == 0, err
    finally:
        go_on.set()
    with pytest.raises(TavError) as raised:
        running.finish()
    assert str(raised.value) == (
        f"the inversion {inversion} was removed by another tav command while this edit ran (run it again)"
    )
    assert not list((project / "edits").glob("*/meta.json"))  # no edit of a removed inversion


def test_rm_refuses_a_kept_tune_while_its_preview_tune_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_tav: RunTav
) -> None:
    from tavcli.settings.tuning import FrameSelection, FrameSize, Preview, TuneRequest, TuneSettings
    from tavcli.workflow import tuning

    project = tmp_path / "p.tav"
    request = TuneRequest(
        clip=CLIP,
        prompt="a man is skiing",
        project=project,
        model="tiny",
        selection=FrameSelection(frames=2),
        size=FrameSize(width=32, height=32),
        settings=TuneSettings(steps=2),
    )
    go_on = threading.Event()
    drawing = _pause(monkeypatch, tuning, "render_preview_sheet", "tune", go_on)  # every preview rendered
    running = Command("tune", tuning.tune, request, preview=Preview(prompt="a dog is skiing", every=1, steps=1))
    running.start()
    assert drawing.wait(PATIENCE)
    kept = next(a for a in running.session.project(project).complete_keys("tunes") if _steps(project, a) == 1)
    try:
        code, _, err = run_tav("rm", f"tunes/{kept}", "-p", project, "--yes")
    finally:
        go_on.set()
    artifacts = running.finish()
    assert code == 1 and "is in use by a running tav command" in err and "nothing was removed" in err, err
    sheet = artifacts[-1]
    assert sheet.kind == "preview" and sheet.path.is_file()
    assert (project / "tunes" / kept / "meta.json").is_file()


def _steps(project: Path, key: str) -> int:
    return int(json.loads((project / "tunes" / key / "meta.json").read_text())["spec"]["steps"])


def _store(tmp_path: Path) -> tuple[Project, Any, Any]:
    """A project with a tune and an inversion of it (no model: plain tensors)."""
    project = Project(tmp_path / "p.tav")
    tune = project.entry("tunes", {"latents": "0" * 16, "prompt": "a man", "steps": 1})
    tune.save({"w": torch.ones(1)}, {})
    inversion = project.entry("inversions", {"tune": tune.key, "steps": 1, "prompt": ""})
    inversion.save({"trajectory": torch.ones(1)}, {})
    return project, tune, inversion


def test_an_entry_in_use_in_another_thread_is_refused_by_remove_and_left_by_gc(tmp_path: Path, run_tav: RunTav) -> None:
    from tavcli.store.housekeeping import garbage, listing
    from tavcli.store.removal import remove

    project, tune, inversion = _store(tmp_path)
    held, done = threading.Event(), threading.Event()

    def use() -> None:
        with Project(project.root).using([inversion], doing="this edit"):
            held.set()
            done.wait(PATIENCE)

    user = threading.Thread(target=use, daemon=True)
    user.start()
    try:
        assert held.wait(PATIENCE)
        (tune.path / "meta.json").unlink()  # its tune gone: the inversion would be garbage, were it not in use
        assert not any(row.kind == "inversions" for row in garbage(project))
        code, out, err = run_tav("gc", "-p", project.root, "--yes")
        assert code == 0 and [json.loads(line)["removed"] for line in out.splitlines()] == [f"tunes/{tune.key}"], err
        assert f"left alone: inversions/{inversion.key} is in use by a running tav command (process " in err
        row = next(row for row in listing(project) if row.kind == "inversions")
        with pytest.raises(TavError, match=rf"inversions/{inversion.key} is in use by a running tav command"):
            remove(project, row)
        assert inversion.complete
    finally:
        done.set()
        user.join(PATIENCE)
    assert any(row.kind == "inversions" for row in garbage(project))  # no longer in use
    remove(project, next(row for row in listing(project) if row.kind == "inversions"))
    assert not inversion.path.exists()
