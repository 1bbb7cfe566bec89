"""What an edit or an inversion needs from the store, decided from keys alone: which inversion (steps and prompt),
which null-text fit and which edit entries, stored or not. Nothing is computed, loaded or written.

The one planner: `plan_edit` computes what it names, `tav batch --dry-run` lists it, and `tav edit
--from-sidecar` compares its key with the sidecar's before computing anything. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tavcli.settings.editing import EditRequest
from tavcli.settings.option import OptionError
from tavcli.settings.sampling import EditSettings, InversionSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.workflow.keys import control_key, edit_entries, inversion_entry, null_text_entry
from tavcli.workflow.source_prompt import source_prompt

if TYPE_CHECKING:  # torch-free: the runtime is only passed on
    from tavcli.runtime import Runtime

__all__ = [
    "EditNeeds",
    "InversionNeeded",
    "command_inversion",
    "edit_needs",
    "inversion_needed",
    "invert_needs",
    "null_text_needed",
]


@dataclass(frozen=True)
class InversionNeeded:
    """The inversion an edit starts from: its DDIM steps and prompt, or (`current`) the project's current one,
    whatever its steps, as a plain `tav edit` of the current tune takes it."""

    steps: int
    prompt: str
    current: bool


def inversion_needed(project: Project, tune: Entry, request: EditRequest) -> InversionNeeded:
    """The inversion `request`'s edits of `tune` start from: with the source prompt when they have one (an
    inversion that gives the clip back, or attention control), else with `--prompt` (default empty); the
    sampling steps unless `--invert-steps` says otherwise."""
    source = source_prompt(project, tune, request)
    steps = request.invert_steps or request.settings.steps
    current = source is None and request.tune_key is None and request.tune_step is None and request.frames.tuned
    return InversionNeeded(steps, request.invert_prompt if source is None else source, current)


def command_inversion(tune: Entry, inversion: InversionSettings, prompt: str) -> str:
    """The prompt `tav invert --inversion` inverts with: `prompt` for plain DDIM; the tune's for an inversion
    that gives the clip back (null-text, negative-prompt), which refuses another `--prompt`."""
    if not inversion.reconstructs:
        return prompt
    source = str(tune.spec["prompt"])
    if prompt and prompt != source:
        raise OptionError(
            f"--inversion {inversion.inversion} inverts with the tune's prompt ({source!r}), not --prompt {prompt!r}",
            "leave out --prompt",
        )
    return source


def invert_needs(
    project: Project,
    tune: Entry,
    *,
    inversion: InversionSettings,
    steps: int,
    prompt: str,
    settings: EditSettings,
    runtime: Runtime,
) -> tuple[Entry, Entry | None]:
    """What `tav invert --inversion` makes of `tune`'s own frames: the inversion (with the prompt
    `command_inversion` chooses) and, for null-text, the fit at `settings`' guidance."""
    entry = inversion_entry(project, tune.key, steps, command_inversion(tune, inversion, prompt), runtime)
    return entry, null_text_needed(project, entry.key, settings, inversion, runtime)


def null_text_needed(
    project: Project, inversion_key: str, settings: EditSettings, inversion: InversionSettings, runtime: Runtime
) -> Entry | None:
    """The null-text fit of `inversion_key` at `settings`' guidance, for a null-text `inversion` (else None)."""
    if inversion.inversion != "null-text":
        return None
    return null_text_entry(project, inversion_key, settings, inversion, runtime)


@dataclass(frozen=True)
class EditNeeds:
    """An edit's entries after its inversion: the null-text fit it samples with (None: none) and each prompt's
    edit entry. The fit is needed only when an edit is sampled."""

    null_text: Entry | None
    edits: dict[str, Entry]

    @property
    def samples(self) -> bool:
        """Whether some edit is missing from the store (so something is sampled, and a fit is needed)."""
        return not all(entry.complete for entry in self.edits.values())

    def entries(self) -> Iterator[tuple[str, Entry, str | None]]:
        """(kind, entry, prompt) of each entry an edit would reuse or compute, in the order it makes them; a fit
        is listed when it is stored or is to be made (when an edit is missing)."""
        if self.null_text is not None and (self.null_text.complete or self.samples):
            yield "null-text", self.null_text, None
        yield from (("edit", entry, prompt) for prompt, entry in self.edits.items())


def edit_needs(project: Project, inversion_key: str, request: EditRequest, runtime: Runtime) -> EditNeeds:
    """The null-text fit and edit entries of `request` after inversion `inversion_key`, keyed as they are stored
    (with the ControlNet's and condition clip's identity when there is a control)."""
    null_text = null_text_needed(project, inversion_key, request.settings, request.inversion, runtime)
    control = None if request.control is None else control_key(request.control)
    fit = None if null_text is None else null_text.key
    return EditNeeds(null_text, edit_entries(project, inversion_key, request, runtime, control, fit))
