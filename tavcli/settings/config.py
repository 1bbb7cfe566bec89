"""Settings from flags, environment, the project's `tav.toml` and the user's `config.toml`.

Precedence, highest first: command-line flag > environment variable > the mixed precision of
`accelerate launch` (its flag or accelerate's config file; its `no` is no choice) > project `tav.toml` >
user `config.toml` > built-in default. `tav config` shows each effective value and where it came from.
This module imports no torch, so `tav config` and `tav --help` stay fast.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from tavcli.choices import Precision, choices
from tavcli.errors import TavError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULTS",
    "ENVIRONMENT",
    "PROJECT_ENV",
    "PROJECT_FILE",
    "Setting",
    "cache_dir",
    "PROJECT_SUFFIX",
    "chosen_project",
    "closest",
    "default_project",
    "find_project",
    "project_for_clip",
    "read_toml",
    "resolve_settings",
    "user_config_path",
    "project_from",
]

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # what the paper and LOVEU-TGVE score with
DEFAULTS: dict[str, str | None] = {
    "model": DEFAULT_MODEL,
    "model_config": None,  # configs for a single-file --model (diffusers infers them online)
    "device": "auto",
    "precision": "auto",
    "project_root": None,
}
ENVIRONMENT = {
    "model": "TAV_MODEL",
    "model_config": "TAV_MODEL_CONFIG",
    "device": "TAV_DEVICE",
    "precision": "TAV_PRECISION",
}
# `accelerate launch --mixed_precision P` (or its config file) tells the processes it starts here. Its
# `no` is also what it says when nothing was chosen, so it leaves the precision to tav's settings.
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"
ACCELERATE_PRECISIONS = {"no": None, "fp16": "fp16", "bf16": "bf16"}
PROJECT_ENV = "TAV_PROJECT"  # the project directory itself, like --project
PROJECT_KEYS = ("model", "model_config", "device", "precision")  # project_root makes no sense inside a project
PROJECT_FILE = "tav.toml"
PROJECT_SUFFIX = ".tav"
CHOICES = {"precision": choices(Precision)}


@dataclass(frozen=True)
class Setting:
    """An effective value and where it came from (`flag`, `env TAV_MODEL`, a file path, or `default`)."""

    value: str | None
    source: str


def cache_dir() -> Path:
    """tavcli's cache folder (`TAV_CACHE_DIR`, else the platform's user cache)."""
    return Path(os.environ.get("TAV_CACHE_DIR") or platformdirs.user_cache_path("tavcli"))


def user_config_path() -> Path:
    """`config.toml` in the platform's user config folder (e.g. ~/.config/tavcli on Linux)."""
    return platformdirs.user_config_path("tavcli") / "config.toml"


def read_toml(path: Path, allowed: tuple[str, ...]) -> dict[str, str]:
    """Read a settings file; unknown keys and non-string values are errors that name the file."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TavError(f"cannot read {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise TavError(f"{path}: {error}", "fix the TOML syntax") from None
    except RecursionError:  # the parser recurses per level of nesting; settings are flat
        raise TavError(f"{path}: its values nest too deeply", 'settings are plain strings: key = "value"') from None
    for key, value in data.items():
        if key not in allowed:
            raise TavError(f"{path}: unknown setting {key!r}{closest(key, allowed)}", f"known: {', '.join(allowed)}")
        if not isinstance(value, str):
            raise TavError(f'{path}: {key} must be a string, e.g. {key} = "..."')
        if value not in CHOICES.get(key, (value,)):
            raise TavError(f"{path}: {key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
    return {key: str(value) for key, value in data.items()}


def resolve_settings(flags: dict[str, str | None], project: Path | None) -> dict[str, Setting]:
    """The effective model (and its configs), device, precision and project root, each with its source."""
    user_path = user_config_path()
    user = read_toml(user_path, tuple(DEFAULTS))
    project_path = project / PROJECT_FILE if project is not None else None
    local = read_toml(project_path, PROJECT_KEYS) if project_path is not None else {}
    settings = {}
    for key, default in DEFAULTS.items():
        env_name = ENVIRONMENT.get(key)
        if flags.get(key) is not None:
            settings[key] = Setting(flags[key], "flag")
        elif env_name and os.environ.get(env_name):
            settings[key] = Setting(os.environ[env_name], f"env {env_name}")
        elif key == "precision" and (launched := _accelerate_precision(os.environ.get(ACCELERATE_ENV, ""))):
            settings[key] = Setting(launched, f"accelerate ({ACCELERATE_ENV})")
        elif key in local:
            settings[key] = Setting(local[key], str(project_path))
        elif key in user:
            settings[key] = Setting(user[key], str(user_path))
        else:
            settings[key] = Setting(default, "default")
    return settings


def _accelerate_precision(mixed_precision: str) -> str | None:
    """tav's name for accelerate's mixed precision, None for `no` or empty (no choice: `accelerate launch`
    without --mixed_precision says `no`); fp8 is not a precision tav trains in."""
    if not mixed_precision:
        return None
    if mixed_precision.lower() not in ACCELERATE_PRECISIONS:
        raise TavError(
            f"accelerate asks for mixed precision {mixed_precision!r}, which tav does not run",
            "launch with --mixed_precision bf16, fp16 or no, or pass --precision",
        )
    return ACCELERATE_PRECISIONS[mixed_precision.lower()]


def project_from(flag: Path | None) -> Setting | None:
    """The project directory named by --project or TAV_PROJECT, if any."""
    if flag is not None:
        return Setting(str(flag), "flag")
    if os.environ.get(PROJECT_ENV):
        return Setting(os.environ[PROJECT_ENV], f"env {PROJECT_ENV}")
    return None


def default_project(clip: Path) -> Path:
    """`clip.mp4` -> `clip.tav/` beside it."""
    return clip.with_name(clip.stem + PROJECT_SUFFIX)


def find_project(given: Path | None) -> Path:
    """`--project` if given, else the only `*.tav` folder in the current directory."""
    if given is not None:
        return given
    candidates = _projects_here()
    if len(candidates) == 1:
        return candidates[0]
    found = "none" if not candidates else ", ".join(p.name for p in candidates)
    raise TavError(f"which project? pass --project (found {found} here)", "`tav tune CLIP PROMPT` creates CLIP.tav")


def chosen_project(flag: Path | None) -> Setting | None:
    """The project --project, TAV_PROJECT or the only `*.tav` folder here names, with where it came from."""
    chosen = project_from(flag)
    if chosen is None:
        found = _projects_here()
        chosen = Setting(str(found[0]), "the only *.tav here") if len(found) == 1 else None
    return chosen


def _projects_here() -> list[Path]:
    return sorted(p for p in Path.cwd().glob(f"*{PROJECT_SUFFIX}") if p.is_dir())


def closest(word: str, known: tuple[str, ...] | list[str]) -> str:
    """' (did you mean X?)' for the closest known word, or ''."""
    match = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def as_dict(settings: dict[str, Setting]) -> dict[str, Any]:
    return {key: {"value": s.value, "source": s.source} for key, s in settings.items()}


def project_for_clip(flag: Path | None, chosen: dict[str, Setting]) -> Callable[[Path], Path]:
    """Where a clip's project is: --project, $TAV_PROJECT, PROJECT_ROOT/CLIP.tav (config), else beside the clip."""
    named = project_from(flag)
    root = chosen["project_root"].value
    if named is not None:
        return lambda clip: Path(named.value or "")
    if root:
        return lambda clip: Path(root).expanduser() / default_project(clip).name
    return default_project
