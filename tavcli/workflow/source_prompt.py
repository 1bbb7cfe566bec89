"""Which prompt an edit's source is (the prompt its inversion is made with, and attention control's source
words are words of), from the project's store alone: torch-free, so that `tav edit` refuses a source blend word
the source prompt lacks before anything heavy is imported."""

from __future__ import annotations

from pathlib import Path

from tavcli.errors import TavError
from tavcli.settings.editing import EditRequest
from tavcli.store.entry import Entry
from tavcli.store.project import Project

__all__ = ["check_source_words", "source_prompt", "stored_inversion"]


def source_prompt(project: Project, tune_entry: Entry, request: EditRequest) -> str | None:
    """The source prompt of `request`'s edits, or None when they invert with the empty prompt (or `--prompt`).

    An inversion that gives the clip back inverts with the tune's prompt, which then replaces the unconditional
    branch. Attention control's maps are the source prompt's: the current inversion's (`tav invert --prompt`),
    else the tune's."""
    if request.inversion.reconstructs:
        return str(tune_entry.spec["prompt"])
    if not request.attention.active:
        return None
    current = stored_inversion(project, tune_entry) if request.tune_key is None and request.frames.tuned else None
    return request.invert_prompt or (current and str(current.spec["prompt"])) or str(tune_entry.spec["prompt"])


def stored_inversion(project: Project, tune_entry: Entry) -> Entry | None:
    """The project's current inversion (`tav invert` made it), if it is of this tune's own frames."""
    key = project.state.get("inversion")
    if key and (project.root / "inversions" / key / "meta.json").is_file():
        entry = project.find("inversions", key)
        if entry.spec.get("tune") == tune_entry.key and not {"latents", "window"} & set(entry.spec):
            return entry
    return None


def check_source_words(request: EditRequest) -> None:
    """Refuse, in one line and before any model or library loads, a source blend word the source prompt lacks
    (a project that cannot say which prompt that is is left to the edit itself to report)."""
    if not request.attention.blend_source or not Path(request.project).is_dir():
        return
    project = Project(request.project)
    try:
        tune_entry = project.find("tunes", request.tune_key or project.current_tune())
    except TavError:
        return  # no tune yet, or a damaged store: the edit says so in its own words
    source = source_prompt(project, tune_entry, request)
    if source is not None:
        request.attention.check_source(source)
