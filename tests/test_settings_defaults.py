"""Every settings default is its option's declared default, and tune settings travel by name: the command line,
batch jobs, the tune's key and the sidecar's `tav tune` command all come from the same fields."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any, cast

import pytest

from tavcli.settings.attention import AttentionSettings
from tavcli.settings.editing import EditRequest, FrameChoice
from tavcli.settings.option import Option, OptionError
from tavcli.settings.options import EDIT, INVERT, SELECTION, TUNE
from tavcli.settings.sampling import ControlSpec, EditSettings, InversionSettings
from tavcli.settings.tuning import FrameSelection, FrameSize, Preview, TuneSettings

# Each settings type, the options its fields are declared in, and the fields named otherwise than their option.
DECLARED: list[tuple[type[Any], dict[str, Option], dict[str, str]]] = [
    (TuneSettings, TUNE, {}),
    (FrameSelection, TUNE, {}),
    (FrameSize, TUNE, {}),
    (Preview, TUNE, {"every": "preview_every", "steps": "preview_steps"}),
    (EditSettings, EDIT, {}),
    (AttentionSettings, EDIT, {}),
    (InversionSettings, INVERT, {}),
    (FrameChoice, SELECTION, {}),
    (ControlSpec, EDIT, {"scale": "control_scale"}),
    (EditRequest, EDIT, {}),
]


# Fields with a default that no option declares: what each is instead (checked to stay so).
UNDECLARED = {
    "EditRequest": {"out", "tune_key", "invert_steps", "control", "loras"},  # paths, keys, a ControlNet
    "ControlSpec": {"video"},  # a path: None computes canny maps of the source
}


@pytest.mark.parametrize("settings, options, renamed", DECLARED, ids=[kind.__name__ for kind, _, _ in DECLARED])
def test_every_settings_default_is_its_declarations(
    settings: type[Any], options: dict[str, Option], renamed: dict[str, str]
) -> None:
    of_field = {option.attribute: option for option in options.values()}
    undeclared = set()
    for field in dataclasses.fields(settings):
        if field.default is dataclasses.MISSING:  # required, or settings of their own (checked on their own)
            continue
        option = INVERT["prompt"] if field.name == "invert_prompt" else options.get(renamed.get(field.name, ""))
        option = option or of_field.get(field.name)
        if option is None:
            undeclared.add(field.name)
            continue
        assert field.default == option.default, f"{settings.__name__}.{field.name} is not {option.flag}'s default"
    assert undeclared == UNDECLARED.get(settings.__name__, set()), f"{settings.__name__}: undeclared defaults"


def test_every_settings_type_made_from_declarations_is_checked_above() -> None:
    from tavcli.settings.declared import Declared

    assert set(Declared.__subclasses__()) <= {kind for kind, _, _ in DECLARED}


def test_the_methods_defaults_are_the_declarations() -> None:
    """The method's own dataclasses repeat the options' defaults (it imports no settings): the same values."""
    from tavcli.method.null_text import NullTextRun
    from tavcli.method.sampling import Guidance
    from tavcli.method.training import TrainingRun

    run = TrainingRun()
    assert (run.steps, run.learning_rate, run.weight_decay, run.seed, run.gradient_checkpointing) == tuple(
        TUNE[name].default for name in ("steps", "lr", "weight_decay", "seed", "gradient_checkpointing")
    )
    fit = NullTextRun(guidance=Guidance(EDIT["guidance"].default))
    assert (fit.iterations, fit.learning_rate) == (INVERT["null_iterations"].default, INVERT["null_lr"].default)
    assert Guidance(1.0).guidance_rescale == EDIT["guidance_rescale"].default


def test_every_tune_option_is_a_field_of_one_tune_settings_type() -> None:
    """A new `tav tune` option is a field: the command line, batch jobs and keys take it from there."""
    fields_of = {field.name for kind in (TuneSettings, FrameSelection, FrameSize) for field in dataclasses.fields(kind)}
    previews = {"preview", "preview_every", "preview_steps"}  # refused without --preview: kept apart
    assert {option.attribute for option in TUNE.values()} - previews == fields_of


def test_tune_settings_are_read_by_option_name_and_keyed_by_field_name() -> None:
    job = {"lr": 1e-4, "steps": 7, "rank": 4, "checkpoint_every": 3, "gradient_checkpointing": True, "model": "tiny"}
    settings = TuneSettings.named(job)
    assert (settings.learning_rate, settings.steps, settings.rank, settings.checkpoint_every) == (1e-4, 7, 4, 3)
    assert settings.gradient_checkpointing
    # Memory and checkpoint settings change how, not what: in no key; a default `key_omits_default` is absent.
    assert settings.keyed() == {"steps": 7, "learning_rate": 1e-4, "seed": 33, "rank": 4, "frame_norm": "joint"}
    assert "save_precision" not in TuneSettings().keyed() and "rank" not in TuneSettings().keyed()
    assert TuneSettings(save_precision="fp16").keyed()["save_precision"] == "fp16"
    assert "weight_decay" not in TuneSettings().keyed() and TuneSettings(weight_decay=0.0).keyed()["weight_decay"] == 0


def test_a_tune_setting_out_of_range_names_its_option_not_its_field() -> None:
    with pytest.raises(OptionError, match="tune settings: lr must be"):
        TuneSettings(learning_rate=0.0)


def test_the_sidecars_tune_command_gives_back_the_settings(tmp_path: Any) -> None:
    """The reproduce command's flags, parsed by `tav tune` itself, make the same settings and so the same key."""
    from typer.main import get_command

    from tavcli.cli import app
    from tavcli.workflow.records import _tune_flags

    settings = TuneSettings(
        steps=7, learning_rate=1e-4, weight_decay=0.0, seed=0, rank=4, save_precision="bf16", frame_norm="frame"
    )
    clip = {"frames": 8, "stride": 3, "start": 1, "width": 64, "height": 48, "resize": "stretch", "fps": "25"}
    command = get_command(app).commands["tune"]  # type: ignore[attr-defined]
    argv = ["clip.mp4", "a man", *shlex.split(shlex.join(map(str, _tune_flags(cast(Any, clip), settings.keyed()))))]
    given = command.make_context("tune", argv).params  # the flags, by the fields they set

    def parsed(kind: type[Any]) -> Any:
        return kind(**{field.name: given[field.name] for field in dataclasses.fields(kind)})

    assert parsed(TuneSettings) == settings
    assert parsed(FrameSelection) == FrameSelection(frames=8, stride=3, start=1)
    assert parsed(FrameSize) == FrameSize(width=64, height=48, resize="stretch")
