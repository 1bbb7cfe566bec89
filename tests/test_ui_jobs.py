"""The app's jobs on the real workflow (tiny model, CPU): Stop keeps a tune's state as Ctrl-C does, and Tune again
resumes it to the very tune an uninterrupted run makes; an edit job renders its prompts and their grid."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tavcli.store.project import Project
from tavcli.ui.forms import EditForm, TuneForm
from tavcli.ui.jobs import Job
from tavcli.ui.studio import Studio, project_summary
from tests.conftest import CLIP, tav_ok

SIZE = {"frames": 4, "width": 64, "height": 64}


def _finish(job: Job, seconds: float = 300) -> Job:
    deadline = time.monotonic() + seconds
    while not job.finished:
        assert time.monotonic() < deadline, f"{job.title} is still {job.state}"
        time.sleep(0.02)
    return job


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[Studio]:
    made = Studio([tmp_path / "ski.tav"], tmp_path / "uploads", 10_000_000)
    yield made
    made.queue.close()


def test_stop_keeps_the_state_and_tune_again_resumes_to_the_same_tune(studio: Studio, tmp_path: Path) -> None:
    project = studio.projects[0]
    form = TuneForm(CLIP, "a man is skiing", project, "tiny", {**SIZE, "steps": 12, "seed": 7})
    job = studio.submit_tune(form)
    while len(job.losses) < 2 and not job.finished:
        time.sleep(0.005)
    studio.queue.request_stop(job)
    _finish(job)
    assert job.state == "stopped", job.error
    stopped_at = len(job.losses)
    assert job.error == f"tune interrupted at step {stopped_at} of 12; its state is saved"
    assert 2 <= stopped_at < 12 and not Project(project).complete_keys("tunes")
    # A reloaded page fills the Tune tab from the stopped run: Tune with it resumes.
    summary = project_summary(project)
    assert (summary["seed"], summary["frames"], summary["prompt"]) == (
        7,
        4,
        "a man is skiing",
    ) and "steps" not in summary

    resumed = _finish(studio.submit_tune(form))
    assert resumed.state == "done", resumed.error
    assert f"resuming from step {stopped_at}" in " ".join(resumed.notes)
    assert len(resumed.losses) == 12 - stopped_at  # only the steps left were trained

    # The same tune as one uninterrupted `tav tune`: the same losses and tensors.
    whole = tmp_path / "whole.tav"
    size = [f"--{name}={value}" for name, value in SIZE.items()]
    tav_ok("tune", CLIP, "a man is skiing", "-p", whole, "-m", "tiny", "--steps", "12", "--seed", "7", *size, "-q")
    [key] = Project(project).complete_keys("tunes")
    assert Project(whole).complete_keys("tunes") == [key]
    ours, theirs = Project(project).at("tunes", key), Project(whole).at("tunes", key)
    assert ours.meta()["losses"] == theirs.meta()["losses"]
    assert all(torch.equal(t, theirs.tensors()[name]) for name, t in ours.tensors().items())


def test_an_edit_job_renders_each_prompt_and_the_grid(studio: Studio) -> None:
    project = studio.projects[0]
    _finish(studio.submit_tune(TuneForm(CLIP, "a man is skiing", project, "tiny", {**SIZE, "steps": 2})))
    options = {"steps": 3, "guidance": 7.5}
    job = _finish(studio.submit_edit(EditForm(project, "a panda is skiing\na man is skiing at sunset", options)))
    assert job.state == "done", job.error
    kinds = [made.kind for made in job.made]
    assert kinds == ["edit", "edit", "grid"]
    assert all(made.path.is_file() for made in job.made)
    assert studio.current(project, "edit") is job


def test_a_tune_with_previews_shows_them_and_its_whole_loss_curve(studio: Studio) -> None:
    from PIL import Image

    from tavcli.ui.views import loss_picture, tune_previews

    project = studio.projects[0]
    options = {**SIZE, "steps": 4, "preview_every": 2}
    job = _finish(studio.submit_tune(TuneForm(CLIP, "a man is skiing", project, "tiny", options, "a panda")))
    assert job.state == "done", job.error
    shown = tune_previews(job)
    assert [Path(file).suffix for file in shown] == [".mp4", ".mp4", ".png"]  # steps 2 and 4, then the sheet
    picture = loss_picture(job)  # the finished tune's own curve, every step
    final = [made for made in job.made if made.kind == "tune"][-1]
    with Image.open(final.details["loss_plot"]) as stored:
        assert picture is not None and picture.tobytes() == stored.convert("RGB").tobytes()
