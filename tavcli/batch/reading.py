"""Reading batch files: TOML (`[[job]]` tables, `[defaults]`) or JSON Lines, from a file or stdin, into each
job's raw fields and where it is (`jobs.toml job 2`, `stdin line 3`). Anything that is no readable batch file
(syntax, shape, nesting past any job's) is refused here, for the whole file, with the line or job.

This module imports no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.reading import MAX_DEPTH, nesting_depth, parse_json
from tavcli.settings.config import closest
from tavcli.settings.inputs import require_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["read_jobs", "read_jsonl", "read_toml"]

# Lists and tables inside one job (or `[defaults]`, or a JSON line): a job uses 3 (`edit` > `lora` > its list).
# Past `MAX_DEPTH` a file is refused before the checks after the parsers run out of recursion.
NESTING_HINT = "a job's fields are values, lists of values and tables of them, nested 3 deep at most"


def read_jobs(given: str) -> tuple[str, str, Path, bool]:
    """(text, source name, folder relative paths start from, is JSON Lines) of `FILE` or `-` (stdin)."""
    if given == "-":
        return sys.stdin.read(), "stdin", Path.cwd(), True
    path = Path(given)
    if not path.exists() and not path.is_symlink():
        raise TavError(f"no batch file {path}", "give a .toml or .jsonl file, or - to read JSON Lines from stdin")
    require_regular_file(
        path, "batch file", "give a .toml or .jsonl file; to read a pipe, use - (cat jobs.jsonl | tav batch -)"
    )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TavError(f"{path} is not UTF-8 text: {error.reason}") from None
    return text, str(path), path.parent.resolve(), path.suffix.lower() in (".jsonl", ".ndjson", ".json")


def read_toml(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    """Each `[[job]]` table with `[defaults]` merged under it (tables field by field), and where it is."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TavError(f"{source}: {error}", "fix the TOML syntax") from None
    except RecursionError:  # the parser recursed once per level
        raise _too_deep(f"{source} line {_deepest_toml_line(text)}") from None
    unknown = set(data) - {"job", "defaults"}
    if unknown:
        key = sorted(unknown)[0]
        raise TavError(f"{source}: unknown table {key!r}{closest(key, ['job', 'defaults'])}", "use [[job]] tables")
    jobs, defaults = data.get("job", []), data.get("defaults", {})
    if not isinstance(jobs, list) or not isinstance(defaults, dict):
        raise TavError(f"{source}: write jobs as [[job]] tables and defaults as one [defaults] table")
    if "name" in defaults:
        raise TavError(f"{source}: [defaults] cannot set name", "every job's name must be its own: name each [[job]]")
    _check_nesting(defaults, f"{source} [defaults]")
    merged = []
    for number, job in enumerate(jobs, start=1):
        if not isinstance(job, dict):
            raise TavError(f"{source}: job {number} must be a [[job]] table, not {type(job).__name__}")
        _check_nesting(job, f"{source} job {number}")
        tables = {
            key: {**defaults[key], **job.get(key, {})}
            for key in ("invert", "edit")
            if isinstance(defaults.get(key), dict) and isinstance(job.get(key, {}), dict)
        }
        merged.append((f"{source} job {number}", {**defaults, **job, **tables}))
    return merged


def read_jsonl(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    """Each line's job object and where it is; blank lines and `#` comments skipped."""
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = parse_json(line)
        except json.JSONDecodeError as error:
            raise TavError(
                f"{source} line {number}, column {error.colno}: {error.msg}", "one JSON object per line"
            ) from None
        except ValueError:  # nested deeper than any job is
            raise _too_deep(f"{source} line {number}") from None
        if not isinstance(data, dict):
            raise TavError(f"{source} line {number}: a job must be a JSON object, not {type(data).__name__}")
        jobs.append((f"{source} line {number}", data))
    return jobs


def _check_nesting(table: dict[str, Any], where: str) -> None:
    """Refuse a job nested deeper than any job is: what reads it later (validation, its messages) recurses."""
    if nesting_depth(table) > MAX_DEPTH:
        raise _too_deep(where)


def _deepest_toml_line(text: str) -> int:
    """The line where TOML nesting exhausts the parser: the fewest lines whose parse does (a search over
    prefixes; cutting a file short only adds errors at its end, after that line)."""
    lines = text.split("\n")
    low, high = 1, len(lines)  # the whole text exhausts it
    while low < high:
        middle = (low + high) // 2
        if _exhausts("\n".join(lines[:middle])):
            high = middle
        else:
            low = middle + 1
    return low


def _exhausts(text: str) -> bool:
    try:
        tomllib.loads(text)
    except RecursionError:
        return True
    except tomllib.TOMLDecodeError:
        return False
    return False


def _too_deep(where: str) -> TavError:
    return TavError(f"{where}: lists and tables nested more than {MAX_DEPTH} levels deep", NESTING_HINT)
