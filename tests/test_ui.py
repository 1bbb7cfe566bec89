"""`tav ui` without a browser: what it refuses before serving, the forms' checks (the command line's), the studio's
clips and projects, the Library's store rules, and what the page shows of a job."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tavcli.errors import TavError
from tavcli.settings.option import OptionError
from tavcli.ui import handlers, library, views
from tavcli.ui.forms import EditForm, TuneForm, edit_request, offered_words, tune_request
from tavcli.ui.jobs import Job, JobQueue
from tavcli.ui.safety import credentials, is_loopback, served
from tavcli.ui.studio import Studio, project_summary
from tests.conftest import CLIP, RunTav, tav_ok


def _no_session(reporter: Any) -> Any:
    raise AssertionError("these tests run no job")


@pytest.fixture
def studio(tmp_path: Path) -> Studio:
    return Studio([], tmp_path / "uploads", upload_limit=2_000_000, make=_no_session)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project tuned on the tiny model (2 steps) and edited once."""
    project = tmp_path_factory.mktemp("ui") / "ski.tav"
    size = ["--frames", "4", "--width", "64", "--height", "64"]
    tav_ok("tune", CLIP, "a man is skiing", "-p", project, "--model", "tiny", "--steps", "2", *size)
    tav_ok("edit", "-p", project, "a panda is skiing", "--steps", "2", "-q")
    return project


# --- refused before serving ------------------------------------------------------------------------------


LOOPBACK = [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True)]


@pytest.mark.parametrize(("host", "loopback"), [*LOOPBACK, ("0.0.0.0", False), ("example.org", False)])
def test_only_this_machine_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_another_host_needs_a_user_and_password() -> None:
    assert credentials("127.0.0.1", None) is None
    with pytest.raises(OptionError, match="--host 0.0.0.0 lets other machines in: give --auth"):
        credentials("0.0.0.0", None)
    assert credentials("0.0.0.0", "ana:pass:word") == ("ana", "pass:word")
    for bad in ("ana", ":pw", "ana:"):
        with pytest.raises(OptionError, match="--auth takes USER:PASSWORD"):
            credentials("0.0.0.0", bad)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--share"], "--share is refused: a public link needs the internet"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines in"),
        (["--auth", "nobody"], "--auth takes USER:PASSWORD"),
        (["no-such.tav"], "no project at no-such.tav"),
        (["--max-upload", "99999999999999999999"], "Invalid value for '--max-upload'"),
    ],
)
def test_tav_ui_refuses_in_one_line(run_tav: RunTav, args: list[str], said: str) -> None:
    code, out, err = run_tav("ui", *args)
    assert code != 0 and out == ""
    assert said in err and len(err.strip().splitlines()) == 1


def test_tav_ui_without_the_extra_says_how_to_get_it(run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else found(name, *a))
    code, _, err = run_tav("ui")
    assert code == 1
    assert 'tav ui needs Gradio, which is not installed (pip install "tavcli[ui]")' in " ".join(err.split())


def test_a_file_is_served_only_from_inside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "p.tav", tmp_path / "secret.txt"
    root.mkdir()
    outside.write_text("x")
    (root / "link").symlink_to(outside)
    assert served(root / "renders" / "a.mp4", [root])
    assert not served(outside, [root])
    assert not served(root / "link", [root])  # links are resolved first
    assert not served(root / ".." / "secret.txt", [root])


# --- the forms take what the command line takes -----------------------------------------------------------


def _tune_form(project: Path, **options: Any) -> TuneForm:
    return TuneForm(CLIP, "a man is skiing", project, "tiny", options)


def test_a_tune_form_is_the_request_tav_tune_makes(tmp_path: Path) -> None:
    values = {"frames": 8.0, "stride": 2, "start": None, "width": 64, "height": 64, "steps": 30, "seed": 5}
    request, preview, given = tune_request(_tune_form(tmp_path / "p.tav", **values))
    assert (request.selection.frames, request.selection.start, request.size.width) == (8, 0, 64)
    assert (request.settings.steps, request.settings.seed, request.model) == (30, 5, "tiny")
    assert preview is None
    assert given == {"frames", "width", "height", "steps", "seed"}  # the model's own defaults apply to the rest


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"frames": 0}, "--frames must be an integer of at least 1, not 0"),
        ({"width": 5000}, "--width must be an integer from 8 to 4,096, not 5000"),
        ({"steps": 2.5}, "--steps must be an integer from 1 to 1,000,000, not 2.5"),
        ({"seed": -1}, "--seed must be an integer from 0 to"),
    ],
)
def test_a_tune_form_is_refused_as_the_flags_are(
    tmp_path: Path, run_tav: RunTav, options: dict[str, Any], said: str
) -> None:
    with pytest.raises(OptionError) as refused:
        tune_request(_tune_form(tmp_path / "p.tav", **options))
    assert said in str(refused.value)
    [(name, value)] = options.items()
    code, _, err = run_tav("tune", CLIP, "x", "-p", tmp_path / "p.tav", f"--{name}", str(value), "--dry-run")
    assert code == 2 and said in " ".join(err.split())


def test_a_preview_prompt_brings_its_options(tmp_path: Path) -> None:
    form = TuneForm(CLIP, "a man", tmp_path / "p.tav", "tiny", {"steps": 20, "preview_every": 5}, "a panda")
    _, preview, _ = tune_request(form)
    assert preview is not None and (preview.prompt, preview.every) == ("a panda", 5)


def test_an_edit_form_is_the_request_tav_edit_makes(tmp_path: Path) -> None:
    options = {"steps": 10, "guidance": 7.5, "seed": 1, "negative": "", "inversion": "ddim"}
    form = EditForm(tmp_path, "a panda is skiing\n\n a man is skiing at sunset ", options)
    request = edit_request(form)
    assert request.prompts == ["a panda is skiing", "a man is skiing at sunset"]
    assert (request.settings.steps, request.settings.guidance) == (10, 7.5)


def test_an_edit_form_is_refused_as_the_flags_are(tmp_path: Path) -> None:
    with pytest.raises(TavError, match="give at least one edit prompt"):
        edit_request(EditForm(tmp_path, " \n ", {}))
    with pytest.raises(OptionError, match="--guidance must be a finite number from 0 to 100, not 101"):
        edit_request(EditForm(tmp_path, "a panda", {"guidance": 101}))
    with pytest.raises(OptionError, match="--blend-edit"):  # a word no edit prompt has
        edit_request(EditForm(tmp_path, "a panda", {"cross_replace": 0.5}, blend_edit=("tiger",)))
    with pytest.raises(TavError, match="no LoRA at"):
        edit_request(EditForm(tmp_path, "a panda", {}, loras=str(tmp_path / "none.safetensors")))


def test_the_prompts_words_are_offered_once_each() -> None:
    assert offered_words("a panda is skiing.\nA man is skiing") == ["a", "panda", "is", "skiing", "man"]


# --- the studio's clips and projects ----------------------------------------------------------------------


def test_an_upload_is_kept_by_its_content_and_gets_one_project(studio: Studio, tmp_path: Path) -> None:
    upload = tmp_path / "gradio-temp" / "My Clip!.mp4"
    upload.parent.mkdir()
    upload.write_bytes(CLIP.read_bytes())
    clip, project = studio.take_clip(upload, uploaded=True)
    assert clip.parent == studio.uploads and clip.name.startswith("My-Clip-") and clip.read_bytes() == CLIP.read_bytes()
    assert project == clip.with_suffix(".tav") and studio.chosen == project
    assert studio.take_clip(upload, uploaded=True) == (clip, project)  # the same clip again: the same project
    assert str(project) in studio.roots and str(studio.uploads) in studio.roots


def test_an_upload_over_the_limit_or_no_clip_is_refused(studio: Studio, tmp_path: Path) -> None:
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * 2_000_001)
    with pytest.raises(TavError, match="the upload is 2 MB, over the limit of 2 MB"):
        studio.take_clip(big, uploaded=True)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(TavError, match="^notes.mp4 is not a video file PyAV can read"):
        studio.take_clip(text, uploaded=True)  # named as the user named it
    with pytest.raises(TavError, match="is no clip tav reads"):
        studio.take_clip(Path(__file__), uploaded=False)
    assert not studio.uploads.exists() or not any(studio.uploads.iterdir())  # nothing kept of a refused upload


def test_a_clip_too_short_for_the_frames_is_refused_before_queueing(studio: Studio, tmp_path: Path) -> None:
    project = studio.add(tmp_path / "p.tav")
    with pytest.raises(TavError, match="has 48 frames, too few for --frames 40 --stride 2"):
        studio.submit_tune(_tune_form(project, frames=40))
    assert studio.queue.jobs() == []


def test_work_on_a_folder_the_app_does_not_serve_is_refused(studio: Studio, tmp_path: Path) -> None:
    with pytest.raises(TavError, match="is not one of the app's projects"):
        studio.submit_tune(_tune_form(tmp_path / "elsewhere.tav"))


def test_opening_a_project_that_is_not_there_is_one_line(studio: Studio, tmp_path: Path) -> None:
    status, _ = handlers.open_project(studio, str(tmp_path / "none.tav"))
    said = f"no project at {tmp_path / 'none.tav'} (create one from a clip on the Project tab)"
    assert status == f"**error:** {views.plain(said)}"


def test_a_folder_that_is_no_project_is_never_opened_nor_served(
    studio: Studio, tmp_path: Path, run_tav: RunTav
) -> None:
    folder = tmp_path / "photos"
    (folder / "edits" / "holiday").mkdir(parents=True)
    (folder / "edits" / "holiday" / "clip.mp4").write_bytes(b"mine")
    status, _ = handlers.open_project(studio, str(folder))
    assert status.startswith("**error:**") and "is a folder, but no tav project" in status
    assert str(folder) not in studio.roots
    code, _, err = run_tav("ui", folder)
    assert code == 1 and "is a folder, but no tav project" in err
    assert (folder / "edits" / "holiday" / "clip.mp4").read_bytes() == b"mine"


def test_a_fresh_page_invites_rather_than_errs(studio: Studio) -> None:
    assert handlers.fill(studio, None)[0] == "Open a project, or start one from a clip on the Project tab."


def test_a_prompt_shows_as_text_never_as_markup() -> None:
    from markdown_it import MarkdownIt

    prompt = "a man ![px](https://1.1.1.1/t.png) <img src=x onerror=alert(1)> `code` *skiing*"
    shown = MarkdownIt().render(views.plain(prompt))
    assert "<img" not in shown and "<em>" not in shown and "<code>" not in shown
    assert "https://1.1.1.1/t.png" in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown


def test_a_tuned_project_fills_the_tune_tab(tuned: Path) -> None:
    summary = project_summary(tuned)
    assert summary["prompt"] == "a man is skiing" and summary["model"] == "tiny"
    assert (summary["frames"], summary["width"], summary["steps"]) == (4, 64, 2)
    assert Path(summary["clip"]) == CLIP


# --- the Library: the store's own rules --------------------------------------------------------------------


def test_the_library_lists_newest_first_and_marks_the_current_entries(tuned: Path) -> None:
    rows = library.library_rows(library.open_project(tuned))
    kinds = [row[0] for row in rows]
    assert {"latents", "tunes", "inversions", "edits"} <= set(kinds)
    created = [row[5] for row in rows]
    assert created == sorted(created, reverse=True)
    assert {row[0] for row in rows if row[6] == "yes"} == {"tunes", "inversions"}


def test_an_entry_in_use_is_refused_and_one_not_in_use_removed(tuned: Path, tmp_path: Path) -> None:
    import shutil

    project_dir = tmp_path / "copy.tav"
    shutil.copytree(tuned, project_dir)
    project = library.open_project(project_dir)
    edit_key = project.complete_keys("edits")[0]
    with project.using([project.find("edits", edit_key)], "a test"):
        note, rows = handlers.remove(Studio([project_dir], tmp_path / "u", 1, _no_session), str(project_dir), edit_key)
        assert note.startswith("**error:**") and "in use" in note
        assert project.find("edits", edit_key).complete
    assert library.remove_entry(project, edit_key[:6]).startswith(f"removed edits/{edit_key[:8]}")
    assert edit_key not in project.complete_keys("edits")
    assert library.verify_entries(project).startswith(f"{len(library.library_rows(project))} of ")


# --- what the page shows of a job ---------------------------------------------------------------------------


def test_a_queued_job_shows_its_place_and_a_finished_one_its_results(tuned: Path) -> None:
    queue = JobQueue(_no_session)
    queue.close()  # no worker: jobs stay as they are made
    job = Job(1, "edit", "edit 'a panda is skiing'", str(tuned), lambda session: [])
    assert views.progress_text(job, queue) == "**edit 'a panda is skiing'**: queued"
    from tavcli.workflow.session import Artifact

    output = next((tuned / "renders").glob("*.mp4"))
    job.made = [Artifact("edit", "k", output, False, 0.1, {"prompt": "a panda is skiing"})]
    job.state, job.seconds = "done", 2.0
    page = views.results_html(job)
    assert views.file_url(output) in page and 'class="tav-sync"' in page
    assert "tav edit &#x27;a panda is skiing&#x27; --project" in page  # the sidecar's command, to copy
    assert views.progress_text(job, queue).endswith("done in 2 s")


class _Session:
    """Stands in for the worker's session: the jobs below only report."""

    reporter: Any = None


def _stand_in(reporter: Any) -> Any:
    return _Session()


def _wait(job: Job) -> None:
    for _ in range(500):
        if job.finished:
            return
        time.sleep(0.01)
    raise AssertionError(f"{job.title} did not finish")


def test_the_poll_shows_a_tunes_loss_once_and_skips_it_while_unchanged(tmp_path: Path) -> None:
    import gradio as gr
    from PIL import Image

    studio = Studio([], tmp_path / "u", 1, make=_stand_in)
    project = studio.add(tmp_path / "p.tav")

    def work(session: Any) -> list[Any]:
        with session.reporter.task("tuning", 2) as advance:
            advance(loss=0.5)
            advance(loss=0.25)
        return []

    _wait(studio.queue.submit("tune", "tune 'x'", str(project), work))
    first = handlers.poll(studio, str(project), {})
    assert first[0] == "**tune 'x'**: done in 0 s" and isinstance(first[1], Image.Image)
    again = handlers.poll(studio, str(project), first[-1])
    assert again[1] == gr.skip() and again[2] == gr.skip() and again[4] == gr.skip()
    assert again[5][0][1:4] == ["tune 'x'", "p.tav", "done"]


def test_jobs_run_one_at_a_time_in_order_and_show_their_place(tmp_path: Path) -> None:
    queue = JobQueue(_stand_in)
    release, order = threading.Event(), []

    def blocking(session: Any) -> list[Any]:
        release.wait(10)
        order.append("first")
        return []

    def failing(session: Any) -> list[Any]:
        order.append("second")
        raise TavError("the clip is gone", "give it again")

    first = queue.submit("tune", "first", "p", blocking)
    second = queue.submit("edit", "second", "p", failing)

    def last(session: Any) -> list[Any]:
        order.append("third")
        return []

    third = queue.submit("edit", "third", "p", last)
    while first.state != "running":
        time.sleep(0.01)
    assert (queue.place(first), queue.place(second), queue.place(third)) == (0, 1, 2)
    assert views.progress_text(third, queue) == "**third**: queued, 2nd in line"
    queue.request_stop(third)  # queued: dropped before it starts
    release.set()
    _wait(second)
    assert order == ["first", "second"] and third.state == "stopped"
    assert (second.state, second.error) == ("failed", "the clip is gone (give it again)")
    queue.close()


def test_the_edit_prompts_words_are_offered_and_ticks_of_words_still_there_kept() -> None:
    blend, weighted = handlers.offer_words("a panda is skiing\na man is skiing", ["panda", "tiger"], None)
    assert blend.choices == weighted.choices
    assert [choice[0] for choice in blend.choices] == ["a", "panda", "is", "skiing", "man"]
    assert (blend.value, weighted.value) == (["panda"], [])


def test_ticked_words_and_a_weight_are_the_reweight_flag(studio: Studio, tuned: Path) -> None:
    studio.add(tuned)
    form: list[Any] = [str(tuned), "a panda is skiing", 2, 7.5, 1, "", "ddim"]
    alone = handlers.edit(studio, *form, 0, 0, [], [], ["panda"], 2.0, "")
    assert alone == "**error:** --reweight applies to --cross-replace: give it too"  # the flags' own rule
    unknown = handlers.edit(studio, *form, 0.5, 0, [], [], ["tiger"], 2.0, "")
    assert unknown.startswith("**error:** --reweight tiger: 'tiger' is not a word of 'a panda is skiing'")
    assert studio.queue.jobs() == []


def test_one_tune_per_project_at_a_time_and_stop_stops_the_running_one(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow_model(reporter: Any) -> Any:
        gate.wait(10)
        raise TavError("no model here")

    studio = Studio([], tmp_path / "u", 1, make=slow_model)
    project = studio.add(tmp_path / "p.tav")
    first = studio.submit_tune(_tune_form(project, frames=4))
    while first.state != "running":
        time.sleep(0.01)
    again = handlers.tune(studio, str(project), str(CLIP), "a man is skiing", "tiny", 4, 2, 0, 64, 64, 5, 33, "", 100)
    said = "tune 'a man is skiing' is running on this project (Stop it, or wait for it to end)"
    assert again == f"**error:** {views.plain(said)}"
    assert handlers.stop(studio, str(project)).startswith("stopping tune")
    assert first.stop.is_set() and studio.current(project, "tune") is first
    gate.set()
    _wait(first)
    assert handlers.stop(studio, str(project)) == "no tune is running on this project"
    studio.queue.close()
