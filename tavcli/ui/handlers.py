"""What each button, field and tick of the page does, as plain functions of the studio and the fields' values
(testable without a browser). A mistake is one line in the page's status; work is queued, never waited for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from tavcli.errors import TavError
from tavcli.settings.tuning import FrameSelection
from tavcli.ui import library, views
from tavcli.ui.forms import EditForm, TuneForm, offered_words, parsed
from tavcli.ui.jobs import Job
from tavcli.ui.studio import Studio, project_summary
from tavcli.words import prompt_words

__all__ = [
    "FILLED",
    "LIBRARY_COLUMNS",
    "TUNE_NUMBERS",
    "collect",
    "edit",
    "entries",
    "fill",
    "frame_strip",
    "offer_words",
    "open_project",
    "poll",
    "remove",
    "restore",
    "stop",
    "take_clip",
    "tune",
    "verify",
]

LIBRARY_COLUMNS = library.COLUMNS
TUNE_NUMBERS = ("frames", "stride", "start", "width", "height", "steps", "seed")  # the Tune tab's number fields
FILLED = ("clip", "prompt", "model", *TUNE_NUMBERS)  # what opening a project fills in, from its tune
T = TypeVar("T")


def error_line(error: TavError | OSError) -> str:
    """The one line the command line would print, for the page's status."""
    text = str(error) if isinstance(error, TavError) else f"{getattr(error, 'filename', '') or ''} {error.strerror}"
    return f"**error:** {views.plain(text.strip())}"


def _checked(work: Callable[[], T], failed: Callable[[str], T]) -> T:
    try:
        return work()
    except (TavError, OSError) as error:
        return failed(error_line(error))


def _project(given: str | None) -> Path:
    if not given:
        raise TavError("no project yet: open one, or start one from a clip on the Project tab")
    return Path(given)


def _project_list(studio: Studio, chosen: Path | None) -> Any:
    return gr.Dropdown(choices=[str(p) for p in studio.projects], value=str(chosen) if chosen else None)


def _queued(studio: Studio, job: Job) -> str:
    place = studio.queue.place(job)
    return views.plain(f"queued {job.title}" + (f", {place} in line" if place > 1 else ""))


def restore(studio: Studio) -> Any:
    """A page (re)opened: the project list, showing the project last chosen (its jobs show as they stand)."""
    return _project_list(studio, studio.chosen)


def fill(studio: Studio, given: str | None) -> tuple[Any, ...]:
    """The Tune tab from the project's current tune (its clip, prompt, model, frames, size, steps), the words of
    its prompt offered for blending, and its library."""

    unchanged = [gr.skip()] * (len(FILLED) + 3)  # the fields, the blend words, the library, the poll's memo
    if not given:  # a fresh page: nothing chosen yet
        return ("Open a project, or start one from a clip on the Project tab.", *unchanged)

    def work() -> tuple[Any, ...]:
        root = Path(given)
        if root in studio.projects:
            studio.chosen = root
        made = root.is_dir()  # a clip's project is made by its first tune
        summary = project_summary(root) if made else {}
        rows = library.library_rows(library.open_project(root)) if made else []
        values = [summary.get(name, gr.skip()) for name in FILLED]
        words = gr.CheckboxGroup(choices=prompt_words(summary.get("prompt", "")), value=[])
        note = views.plain(f"project {root}" + ("" if summary else " (not tuned yet)"))
        return (note, *values, words, rows, {})

    return _checked(work, lambda line: (line, *unchanged))


def open_project(studio: Studio, given: str) -> tuple[Any, Any]:
    def work() -> tuple[Any, Any]:
        root = studio.open(given)
        return views.plain(f"opened {root}"), _project_list(studio, root)

    return _checked(work, lambda line: (line, gr.skip()))


def take_clip(studio: Studio, given: str | None, uploaded: bool) -> tuple[Any, Any, Any]:
    """A clip uploaded (or named by its path) and the project it gets, chosen; its Tune tab shows it."""

    def work() -> tuple[Any, Any, Any]:
        if not given or not str(given).strip():
            raise TavError("give a clip: upload one or type its path")
        clip, root = studio.take_clip(Path(str(given).strip()).expanduser(), uploaded)
        note = views.plain(f"clip {clip.name}: project {root}; describe it on the Tune tab")
        return note, _project_list(studio, root), str(clip)

    return _checked(work, lambda line: (line, gr.skip(), gr.skip()))


def frame_strip(clip: str, frames: Any, stride: Any, start: Any) -> tuple[Any, str]:
    """The clip's frames with the ones `frames`, `stride` and `start` take marked (an error for a bad value)."""
    from tavcli.media.strip import frame_strip as strip

    def work() -> tuple[Any, str]:
        if not clip:
            return None, gr.skip()
        values = parsed(FrameSelection.OPTIONS, {"frames": frames, "stride": stride, "start": start})
        return strip(Path(clip), FrameSelection.named(values)), gr.skip()

    return _checked(work, lambda line: (gr.skip(), line))


def tune(studio: Studio, given: str | None, clip: str, prompt: str, model: str, *values: Any) -> str:
    """Queue a tune of the form's settings (`tav tune`'s checks first)."""
    *numbers, preview, preview_every = values
    options = dict(zip(TUNE_NUMBERS, numbers, strict=True))

    def work() -> str:
        if not clip:
            raise TavError("no clip: start from one on the Project tab")
        form = TuneForm(
            Path(clip), prompt, _project(given), model, {**options, "preview_every": preview_every}, preview
        )
        return _queued(studio, studio.submit_tune(form))

    return _checked(work, lambda line: line)


def stop(studio: Studio, given: str | None) -> str:
    """Stop the project's running tune after its current step, its state kept (Tune again resumes)."""
    job = studio.current(Path(given), "tune") if given else None
    if job is None or job.finished:
        return "no tune is running on this project"
    studio.queue.request_stop(job)
    if job.state == "stopped":  # it was queued: dropped
        return views.plain(f"{job.title} will not run")
    return views.plain(f"stopping {job.title} after its current step; Tune again resumes it")


def offer_words(prompts: str, *ticked: list[str] | None) -> tuple[Any, ...]:
    """The edit prompts' words, offered for blending and for reweighting; ticked words still there stay ticked."""
    words = offered_words(prompts or "")
    return tuple(gr.CheckboxGroup(choices=words, value=[w for w in given or () if w in words]) for given in ticked)


def edit(studio: Studio, given: str | None, prompts: str, steps: Any, guidance: Any, seed: Any, *rest: Any) -> str:
    """Queue edits of the form's prompts (`tav edit`'s checks first)."""
    negative, inversion, cross, self_replace, blend_source, blend_edit, reweighted, weight, loras = rest
    reweight = ",".join(f"{word}={weight}" for word in reweighted or ())
    options = {"steps": steps, "guidance": guidance, "seed": seed, "negative": negative or "", "inversion": inversion}
    options |= {"cross_replace": cross or 0, "self_replace": self_replace or 0}

    def work() -> str:
        form = EditForm(
            _project(given), prompts or "", options, tuple(blend_source or ()), tuple(blend_edit or ()),
            reweight, loras or "",
        )  # fmt: skip
        return _queued(studio, studio.submit_edit(form))

    return _checked(work, lambda line: line)


def _library(given: str | None, act: Callable[[Any], str]) -> tuple[str, Any]:
    def work() -> tuple[str, Any]:
        project = library.open_project(_project(given))
        note = act(project)
        return note, library.library_rows(project)

    return _checked(work, lambda line: (line, gr.skip()))


def entries(studio: Studio, given: str | None) -> tuple[str, Any]:
    """The Library as it is now (a terminal may have changed the store since)."""
    if given and not Path(given).exists():
        return "nothing stored yet: the project is made by its first tune", []
    return _library(given, lambda project: "")


def remove(studio: Studio, given: str | None, key: str) -> tuple[str, Any]:
    """`tav rm KEY`: refused in one line while a job (here or in a terminal) computes or uses it."""
    if not (key or "").strip():
        return "give the key of the entry to remove", gr.skip()
    return _library(given, lambda project: library.remove_entry(project, key.strip()))


def verify(studio: Studio, given: str | None) -> tuple[str, Any]:
    return _library(given, library.verify_entries)


def collect(studio: Studio, given: str | None) -> tuple[str, Any]:
    return _library(given, library.collect_garbage)


def _gallery(files: list[str]) -> Any:
    return gr.Gallery(value=files, visible=bool(files))


def poll(studio: Studio, given: str | None, shown: dict[str, Any]) -> tuple[Any, ...]:
    """Every second: the project's newest tune and edit jobs as they stand, and the job list. What has not
    changed since the last tick is skipped, so that playing videos are not reloaded."""
    root = Path(given) if given else None
    tuned = studio.current(root, "tune") if root else None
    edited = studio.current(root, "edit") if root else None
    losses = (tuned.id, len(tuned.losses), tuned.state) if tuned else None
    made = (tuned.id, len(tuned.made)) if tuned else None
    result = (edited.id, edited.state) if edited else None
    now = {"losses": losses, "made": made, "result": result}

    def changed(name: str, value: Callable[[], Any]) -> Any:
        return value() if shown.get(name) != now[name] else gr.skip()

    return (
        views.progress_text(tuned, studio.queue),
        changed("losses", lambda: views.loss_picture(tuned)),
        changed("made", lambda: _gallery(views.tune_previews(tuned))),
        views.progress_text(edited, studio.queue),
        changed("result", lambda: views.results_html(edited)),
        views.jobs_table(studio.queue),
        now,
    )
