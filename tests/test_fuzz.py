"""Fuzzing: no input makes the batch-file and config parsers or the slugging raise anything but TavError."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tavcli.batch import parse_jobs
from tavcli.errors import TavError
from tavcli.settings.config import read_toml
from tavcli.workflow.rendering import slug

BASE = Path("/tmp/tav-fuzz")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["clip", "prompt", "edits", "name", "steps", "frames", "edit", "invert", "model", "lr"])
JOB = st.dictionaries(FIELDS | st.text(max_size=8), JSON, max_size=6)


def _parses_or_refuses(text: str, jsonl: bool) -> None:
    try:
        jobs, problems = parse_jobs(text, "jobs", BASE, jsonl=jsonl)
    except TavError:
        return
    for problem in problems:
        assert str(problem)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_any_text_as_a_batch_file(text: str, jsonl: bool) -> None:
    _parses_or_refuses(text, jsonl)


@settings(max_examples=300, deadline=None)
@given(st.lists(JOB | JSON, min_size=1, max_size=4))
def test_any_json_lines(jobs: list[object]) -> None:
    _parses_or_refuses("\n".join(json.dumps(job) for job in jobs), jsonl=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(JOB, max_size=3), st.dictionaries(FIELDS, JSON, max_size=3))
def test_any_toml_jobs_and_defaults(jobs: list[dict], defaults: dict) -> None:
    lines = []
    for key, value in defaults.items():
        lines.append(f"defaults.{json.dumps(key)} = {_toml_value(value)}")
    for job in jobs:
        lines.append("[[job]]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in job.items()]
    _parses_or_refuses("\n".join(lines), jsonl=False)


def _toml_value(value: object) -> str:
    """An inline TOML value for JSON-like data (null has no TOML form: a string stands in)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or value == value and abs(value) != float("inf") else "0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


CONFIG_DIR = Path(tempfile.mkdtemp(prefix="tav-fuzz-config-"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_config_file(text: str) -> None:
    path = CONFIG_DIR / "config.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(TavError):
        read_toml(path, ("model", "device", "precision", "project_root"))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_slugs_are_safe_file_names(text: str) -> None:
    name = slug(text)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) and len(name) <= 48
    assert "/" not in name and ".." not in name
