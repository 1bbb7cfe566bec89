"""Every option's range, from its one declaration (`tavcli.settings.options`), is enforced alike by the command line,
batch validation and `--from-sidecar`, with one line, before anything heavy is imported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tavcli.batch import parse_jobs
from tavcli.errors import TavError
from tavcli.settings.option import Option, OptionError
from tavcli.settings.options import EDIT, INVERT, TUNE
from tavcli.store.sidecar import recorded_edit

from .conftest import CLIP, RunTav, tav_in_fresh_python

TABLES = {"tune": TUNE, "invert": INVERT, "edit": EDIT}
ARGS = {"tune": ["tune", str(CLIP), "a man"], "invert": ["invert"], "edit": ["edit", "a dog"]}
BATCH_PREFIX = {"tune": "", "invert": "invert.", "edit": "edit."}
NUMERIC = [
    pytest.param(command, option, id=f"{command}{option.flag}")
    for command, table in TABLES.items()
    for option in table.values()
    if option.kind in (int, float)
]


def refused(option: Option) -> list[str]:
    """Values outside the option's declared type and range, as typed on a command line."""
    values = ["abc", "nan", "inf", "-inf"] + (["1.5"] if option.kind is int else [])
    if option.low is not None:
        values.append(str(option.low) if option.above else str(option.low - (1 if option.kind is int else 0.005)))
    if option.high is not None:
        values.append(str(option.high + 1))
    return values


def as_json(text: str) -> object:
    """What a batch file would hold for `text`: a number (NaN and inf included) or a string."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


@pytest.mark.parametrize("command, option", NUMERIC)
def test_declared_range_is_enforced_by_command_line_batch_and_sidecar(
    command: str, option: Option, tmp_path: Path, run_tav: RunTav
) -> None:
    for value in refused(option):
        code, out, err = run_tav(*ARGS[command], option.flag, value)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and out == "" and len(lines) == 1, err
        assert lines[0].startswith(f"error: {option.flag} must be {option.describe()}, not {value}"), err

        field = option.name
        job: dict[str, object] = {"clip": str(CLIP), "prompt": "a man", "edits": ["a dog"]}
        if BATCH_PREFIX[command]:
            job[command] = {field: as_json(value)}
        else:
            job[field] = as_json(value)
        jobs, problems = parse_jobs(json.dumps(job), "jobs.jsonl", tmp_path, jsonl=True)
        assert not jobs and f"field '{BATCH_PREFIX[command]}{field}' must be {option.describe()}" in str(problems[0])

        if command == "edit" and field in _SIDECAR_FIELDS:
            sidecar = _sidecar(tmp_path, field, as_json(value))
            with pytest.raises(TavError, match=f"{field} must be|not a tav sidecar") as refusal:
                recorded_edit(sidecar)
            assert isinstance(refusal.value, OptionError) or field == "fps"  # fps is recorded as a fraction
    assert option.default is None or option.check(option.default) == option.default


def test_ranges_are_what_the_docs_say() -> None:
    assert TUNE["seed"].high == 2**64 - 1 and EDIT["seed"].high == 2**64 - 1  # torch.Generator().manual_seed's range
    assert EDIT["eta"].describe() == "a finite number from 0 to 1"
    assert TUNE["lr"].describe() == "a finite number above 0 and at most 1"
    assert INVERT["steps"].describe() == "an integer from 1 to 999"
    for value in (math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError):
            TUNE["lr"].check(value)


_SIDECAR_FIELDS = {"steps", "guidance", "seed", "eta", "fps"}


def _sidecar(folder: Path, field: str, value: object) -> Path:
    """A sidecar as `tav edit` writes it, with one field changed."""
    edit = {"key": "0" * 16, "prompt": "a dog", "steps": 2, "guidance": 12.5, "negative": "", "seed": None, "eta": 0.0}
    output = {"format": "mp4", "fps": "15", "frames": 2, "height": 32, "width": 32}
    record = {
        "project": str(folder / "p.tav"),
        "tune": {"key": "1" * 16},
        "inversion": {"key": "2" * 16, "steps": 2, "prompt": ""},
        "edit": edit,
        "output": output,
    }
    if field == "fps":
        output["fps"] = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    else:
        edit[field] = value
    path = folder / "out.mp4.json"
    path.write_text(json.dumps(record))
    return path


def test_sidecar_with_an_unreadable_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TavError, match="not a tav sidecar"):
        recorded_edit(_sidecar(tmp_path, "fps", "fast"))


def test_sidecar_edited_into_nonsense_is_refused_in_one_line(tmp_path: Path) -> None:
    for field, value in (("prompt", 3), ("prompt", ["a dog"])):
        with pytest.raises(TavError, match="not a tav sidecar: its prompt or batch is not text"):
            recorded_edit(_sidecar(tmp_path, field, value))
    path = _sidecar(tmp_path, "steps", 2)
    record = json.loads(path.read_text())
    record["control"] = {"kind": "canny", "model": "m", "video": None, "scale": 1.0}
    path.write_text(json.dumps(record))
    with pytest.raises(TavError, match="records a control its edit does not use"):
        recorded_edit(path)
    record["control"], record["batch"] = None, "a dog"
    path.write_text(json.dumps(record))
    with pytest.raises(TavError, match="its prompt or batch is not text"):
        recorded_edit(path)


def test_gif_rate_above_fifty_is_refused_everywhere(tmp_path: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav("edit", "a dog", "-f", "gif", "--fps", "60", "-p", tmp_path)
    assert code == 2 and "too fast for a GIF" in err
    job = {"clip": str(CLIP), "prompt": "a man", "edits": ["a dog"], "edit": {"format": "gif", "fps": 60}}
    jobs, problems = parse_jobs(json.dumps(job), "jobs.jsonl", tmp_path, jsonl=True)
    assert not jobs and "too fast for a GIF" in str(problems[0])


MISTAKES = [
    ["tune", str(CLIP), "a man", "--lr", "nan"],
    ["tune", str(CLIP), "a man", "--frames", "1000000000000"],
    ["tune", str(CLIP), "   "],
    ["tune", "/dev/null", "a man"],
    ["edit", "a dog", "--guidance", "inf", "-p", "nowhere.tav"],
    ["edit", "a dog", "-f", "gif", "--fps", "60", "-p", "nowhere.tav"],
    ["edit", "a dog", "--control", "pose", "-p", "nowhere.tav"],
    ["invert", "--steps", "0"],
    ["batch", "/dev/null"],
    ["edit", "--from-sidecar", str(CLIP)],
]


@pytest.mark.parametrize("argv", MISTAKES, ids=lambda argv: " ".join(argv[:2] + argv[-2:]))
def test_mistakes_are_reported_before_torch_is_imported(argv: list[str], tmp_path: Path) -> None:
    torch_loaded, status, err = tav_in_fresh_python(argv, tmp_path)
    assert not torch_loaded and status in ("1", "2"), err
    assert err.startswith("error: ") and "Traceback" not in err


def test_every_option_is_named_its_flag_whatever_the_typer_version() -> None:
    """Flags are lower case, and an option whose metavar is its name in capitals declares its flag:
    typer 0.27 named an option after a metavar that is its name in capitals (`--DEVICE`), so on a machine with
    that typer `tav tune --device cuda` was refused."""
    import inspect

    import typer

    from .conftest import tav_commands

    for name, command in tav_commands().items():
        for param in command.params:
            assert all(flag == flag.lower() for flag in param.opts), (name, param.opts)
        for parameter in inspect.signature(command.callback).parameters.values():
            for info in getattr(parameter.annotation, "__metadata__", ()):
                if isinstance(info, typer.models.OptionInfo) and info.metavar == parameter.name.upper():
                    flags = [*(info.param_decls or ()), info.default]  # under Annotated a first "--flag" is `default`
                    assert any(isinstance(flag, str) and flag.startswith("--") for flag in flags), (name, parameter)
