"""The contract between planning an edit, sampling it, rendering it and recording it, and the guidance every
sampler of an edit is given (`guidance_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tavcli.method.control import ControlGuide
from tavcli.method.sampling import Guidance
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.options import EDIT, GUIDANCE
from tavcli.settings.sampling import EditSettings
from tavcli.store.entry import Entry
from tavcli.store.project import Project
from tavcli.store.specs import ClipFacts
from tavcli.workflow.session import Artifact

__all__ = ["EditPlan", "guidance_of"]


@dataclass
class EditPlan:
    """An edit request resolved against its project: the tune, the inversion, each prompt's entry."""

    project: Project
    tune: Entry
    inversion: Entry
    clip: ClipFacts  # the edited frames' facts (path, fps, selection, size): tuned or chosen by --frames
    entries: dict[str, Entry]  # by prompt
    groups: list[list[str]]
    guide: ControlGuide | None
    loras: tuple[tuple[Path, float], ...] = ()
    # The unconditional branch when it is not the negative prompt's: null-text embeddings (their entry), or the
    # source prompt (negative-prompt inversion).
    unconditional: Entry | str | None = None
    attention: AttentionSettings = field(default_factory=AttentionSettings)  # off by default
    guidance: Guidance = field(default_factory=lambda: Guidance(EDIT["guidance"].default))  # every sampler's
    inverted: Artifact | None = None  # the inversion planning made or found (None: the project's current one)


def guidance_of(settings: EditSettings) -> Guidance:
    """The classifier-free guidance of `settings`, made of the edit options declared `guides=True` by name: what
    plain sampling, attention control's source branch and the null-text fit are all given."""
    return Guidance(**{name: getattr(settings, name) for name in GUIDANCE})
