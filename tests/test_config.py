"""Settings precedence: flag > environment > project tav.toml > user config.toml > default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tavcli.errors import TavError
from tavcli.settings.config import resolve_settings, user_config_path

from .conftest import RunTav


def _write_user_config(text: str) -> Path:
    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_layer_overrides_the_ones_below(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert str(user_config_path()).startswith(os.environ["XDG_CONFIG_HOME"])
    project = tmp_path / "p.tav"
    project.mkdir()
    assert resolve_settings({}, project)["model"].source == "default"
    user = _write_user_config('model = "user/model"\ndevice = "cpu"\nprecision = "fp32"\nproject_root = "~/clips"\n')
    (project / "tav.toml").write_text('model = "project/model"\ndevice = "cuda"\n')
    monkeypatch.setenv("TAV_MODEL", "env/model")

    settings = resolve_settings({"model": "flag/model"}, project)
    assert (settings["model"].value, settings["model"].source) == ("flag/model", "flag")
    settings = resolve_settings({"model": None}, project)
    assert (settings["model"].value, settings["model"].source) == ("env/model", "env TAV_MODEL")
    assert (settings["device"].value, settings["device"].source) == ("cuda", str(project / "tav.toml"))
    assert (settings["precision"].value, settings["precision"].source) == ("fp32", str(user))
    assert settings["project_root"].value == "~/clips"
    monkeypatch.delenv("TAV_MODEL")
    assert resolve_settings({}, project)["model"].value == "project/model"
    assert resolve_settings({}, None)["model"].value == "user/model"


def test_bad_config_files_name_the_file_and_the_key(tmp_path: Path) -> None:
    _write_user_config('modle = "x"\n')
    with pytest.raises(TavError, match=r"unknown setting 'modle' \(did you mean 'model'\?\)"):
        resolve_settings({}, None)
    _write_user_config('precision = "fp8"\n')
    with pytest.raises(TavError, match="precision must be one of auto, fp32, fp16, bf16"):
        resolve_settings({}, None)
    _write_user_config("model = \n")
    with pytest.raises(TavError, match="config.toml"):
        resolve_settings({}, None)
    _write_user_config("")
    project = tmp_path / "p.tav"
    project.mkdir()
    (project / "tav.toml").write_text('project_root = "x"\n')  # only meaningful in the user config
    with pytest.raises(TavError, match="unknown setting 'project_root'"):
        resolve_settings({}, project)


def test_tav_config_shows_values_and_sources(tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.tav").mkdir()
    (tmp_path / "clip.tav" / "tav.toml").write_text('model = "tiny"\n')
    monkeypatch.setenv("TAV_DEVICE", "cpu")
    code, out, err = run_tav("config", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["model"] == {"value": "tiny", "source": str(tmp_path / "clip.tav" / "tav.toml")}
    assert shown["device"] == {"value": "cpu", "source": "env TAV_DEVICE"}
    assert shown["precision"]["source"] == "default"
    assert shown["project"] == {"value": str(tmp_path / "clip.tav"), "source": "the only *.tav here"}
    code, _, err = run_tav("config")
    assert code == 0 and "env TAV_DEVICE" in err


@pytest.mark.slow
def test_config_chooses_the_model_and_project_root_for_tune(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import CLIP

    _write_user_config(f'model = "tiny"\nproject_root = "{tmp_path / "projects"}"\n')
    small = ["--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *small)
    assert code == 0, err
    tune = json.loads(out.splitlines()[-1])
    assert Path(tune["path"]).parent.parent == tmp_path / "projects" / "man-skiing.tav"
    monkeypatch.setenv("TAV_PROJECT", str(tmp_path / "env.tav"))
    code, out, err = run_tav("tune", CLIP, "a man is skiing", *small)
    assert code == 0 and (tmp_path / "env.tav" / "project.json").exists()
    code, out, err = run_tav("ls", "--json")  # TAV_PROJECT also picks the project for other commands
    assert code == 0 and {json.loads(line)["kind"] for line in out.splitlines()} >= {"latents", "tunes"}
