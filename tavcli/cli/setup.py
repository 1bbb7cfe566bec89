"""What every command sets up from its options: settings, the model's name, the session, the project.

Nothing here imports torch until a session is made, so the commands check their inputs first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tavcli.errors import TavError
from tavcli.settings.config import Setting, find_project, project_from, resolve_settings

if TYPE_CHECKING:
    from tavcli.store.project import Project
    from tavcli.workflow.session import Session

__all__ = ["existing_project", "model_for", "open_store", "session", "settings"]


def settings(project: Path | None, **flags: str | None) -> dict[str, Setting]:
    """The effective model, device, precision and project root: flags over the configuration."""
    return resolve_settings(flags, project)


def model_for(
    chosen: dict[str, Setting],
    loras: Sequence[str] = (),
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
) -> str:
    """The model a command tunes: --model with --model-config, --lora, --revision, --variant and --vae folded in."""
    from tavcli.models.names import model_name

    base, config = chosen["model"].value or "", chosen["model_config"]
    if config.source == "flag":
        return model_name(base, config.value, loras, revision=revision, variant=variant, vae=vae)
    return model_name(base, loras=loras, default_config=config.value, revision=revision, variant=variant, vae=vae)


def session(chosen: dict[str, Setting], allow_pickle: bool, compile_unet: bool = False) -> Session:
    """Where the work runs and which models are loaded: the first thing that imports torch."""
    from tavcli.cli.output import RichReporter
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.session import Session

    device, precision = chosen["device"].value or "auto", chosen["precision"].value or "auto"
    runtime = resolve_runtime(device, precision, compile=compile_unet)
    return Session(runtime, RichReporter(), allow_pickle)


def existing_project(flag: Path | None) -> Path:
    """--project, $TAV_PROJECT, else the only `*.tav` folder here."""
    named = project_from(flag)
    return find_project(Path(named.value or "") if named else None)


def open_store(flag: Path | None) -> Project:
    """The project the store commands look after (refused if missing or written by a newer tav)."""
    from tavcli.store.project import Project

    root = existing_project(flag)
    if not root.is_dir():
        raise TavError(f"no project at {root}", "`tav tune CLIP PROMPT` creates one")
    store = Project(root)
    store.check_version()
    return store
