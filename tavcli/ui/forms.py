"""The page's forms as the command line's requests: each field is checked by the option it stands for, so the
app takes the same ranges and says the same one-line errors as `tav tune` and `tav edit`. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.models.names import lora_path, model_name
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.config import resolve_settings
from tavcli.settings.editing import EditRequest
from tavcli.settings.option import Option
from tavcli.settings.options import EDIT, INVERT, TUNE
from tavcli.settings.sampling import EditSettings, InversionSettings
from tavcli.settings.tuning import FrameSelection, FrameSize, Preview, TuneRequest, TuneSettings, preview_choice
from tavcli.words import prompt_words

__all__ = ["EditForm", "TuneForm", "edit_request", "offered_words", "parsed", "tune_request"]


def parsed(options: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """The page's values by option name, each checked by its option (an empty field takes the default); a bad
    one is the command line's error: `--frames must be an integer of at least 1, not 0`."""
    checked = {}
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip() and options[name].kind is not str):
            continue
        if isinstance(value, float) and options[name].kind is int and value.is_integer():
            value = int(value)  # a number box's 8.0
        checked[name] = options[name].parse(value)
    return checked


@dataclass(frozen=True)
class TuneForm:
    """The Tune tab's fields: the clip, what it shows, the model, and the tune options shown, by name."""

    clip: Path
    prompt: str
    project: Path
    model: str
    options: Mapping[str, Any]
    preview: str = ""  # a preview prompt: none when empty


def tune_request(form: TuneForm) -> tuple[TuneRequest, Preview | None, set[str]]:
    """The request `tav tune CLIP PROMPT -p PROJECT --model MODEL ...` makes, its previews, and the options given
    (so that a model's own defaults, SDXL's frames, apply where the page left the default)."""
    values = parsed(TUNE, form.options)
    every, steps = values.pop("preview_every", None), values.pop("preview_steps", None)
    wanted = form.preview.strip() or None  # the page always sends the interval: it counts only with a prompt
    preview = preview_choice(wanted, every if wanted else None, steps if wanted else None)
    request = TuneRequest(
        clip=form.clip,
        prompt=form.prompt,
        project=form.project,
        model=_model(form.model, form.project),
        selection=FrameSelection.named(values),
        size=FrameSize.named(values),
        settings=TuneSettings.named(values),
    )
    given = {name for name, value in values.items() if value != TUNE[name].default}
    return request, preview, given


def _model(given: str, project: Path) -> str:
    """The model field as `--model` is taken: empty is the configured model (`tav config`), whose single-file
    config the configuration may name too."""
    chosen = resolve_settings({"model": given.strip() or None}, project)
    return model_name(chosen["model"].value or "", default_config=chosen["model_config"].value)


@dataclass(frozen=True)
class EditForm:
    """The Edit tab's fields: prompts one per line, options by name, attention control's words, LoRAs."""

    project: Path
    prompts: str
    options: Mapping[str, Any]
    blend_source: tuple[str, ...] = ()
    blend_edit: tuple[str, ...] = ()
    reweight: str = ""  # WORD=SCALE, comma separated
    loras: str = ""  # PATH or PATH:SCALE, one per line


def edit_request(form: EditForm) -> EditRequest:
    """The request `tav edit -p PROJECT PROMPT... --grid ...` makes, with the same checks."""
    prompts = [line.strip() for line in form.prompts.splitlines() if line.strip()]
    if not prompts:
        raise TavError("give at least one edit prompt, one per line", 'e.g. "a panda is skiing"')
    options = {**EDIT, **{name: INVERT[name] for name in ("inversion", "null_iterations", "null_lr")}}
    values = parsed(options, form.options)
    reweight = tuple(part.strip() for part in form.reweight.split(",") if part.strip())
    attention = {"blend_source": form.blend_source, "blend_edit": form.blend_edit, "reweight": reweight}
    values.update(parsed(EDIT, {name: value for name, value in attention.items() if value}))
    loras = [line.strip() for line in form.loras.splitlines() if line.strip()]
    return EditRequest(
        project=form.project,
        prompts=prompts,
        settings=EditSettings.named(values),
        inversion=InversionSettings.named(values),
        attention=AttentionSettings.named(values),
        loras=tuple(lora_path(given) for given in loras),
    )


def offered_words(prompts: str) -> list[str]:
    """The words attention control can name in these prompts (one per line), each once, in order."""
    return list(dict.fromkeys(word for line in prompts.splitlines() for word in prompt_words(line)))
