"""docs/cli.md's option tables are the ones docs/generate_cli_reference.py writes from the command tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

GENERATOR = Path(__file__).parent.parent / "docs" / "generate_cli_reference.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_cli_reference", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_option_tables_are_current() -> None:
    stale: list[str] = _generator().stale_commands()
    assert not stale, f"docs/cli.md is stale for {', '.join(stale)}: run `python docs/generate_cli_reference.py`"
