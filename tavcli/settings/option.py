"""One option of `tav tune`, `tav invert` or `tav edit` as data (`Option`: flag, type, range, default, help), its
checks, and the usage error a value outside its declaration is (`OptionError`). The declarations themselves are
`tavcli.settings.options`'.

This module imports neither torch nor typer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tavcli.errors import TavError

__all__ = ["Option", "OptionError", "check_fields"]


class OptionError(TavError):
    """A flag, batch field or sidecar value outside its declared type or range: a usage error (status 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Option:
    """One option: its flag, value type, range (inclusive unless `above`), default and help."""

    flag: str
    kind: type  # int, float, str or bool; str with `allowed` is a choice
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False  # `low` itself is not allowed
    allowed: tuple[str, ...] = ()
    why: str = ""  # a hint given with a refused value
    words: tuple[str, ...] = ()  # words a number option also takes (`--frames all`)
    value_name: str = ""  # the metavar in --help, where the type's name says too little (`PROMPT`)
    # Left out of cache keys at its default, so that entries keyed before the option existed stay valid.
    key_omits_default: bool = False
    many: bool = False  # repeatable: the value is a tuple of such values (default `()`)
    # The settings dataclass's field, where it is not `name` (`--lr` sets `learning_rate`, the key's word).
    field: str = ""
    keyed: bool = True  # False: changes how a result is computed, not what (memory, checkpoints): in no key
    guides: bool = False  # part of classifier-free guidance: null-text is fitted at it, `tav invert` takes it

    @property
    def name(self) -> str:
        """The field name in batch files, sidecars and Python: `--checkpoint-every` -> `checkpoint_every`."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def attribute(self) -> str:
        """The settings dataclass's field this option sets: `field`, else `name`."""
        return self.field or self.name

    @property
    def metavar(self) -> str:
        if self.value_name:
            return self.value_name
        number = {int: "INT", float: "FLOAT", str: "TEXT"}.get(self.kind, "")
        return "|".join((number, *self.words)) if self.words else number

    def describe(self) -> str:
        """What a valid value is, in words: 'an integer from 1 to 999', 'a finite number above 0'."""
        if self.many:
            return f"a list of {'text' if self.kind is str else self.kind.__name__} values"
        if self.allowed:
            return f"one of {', '.join(self.allowed)}"
        if self.kind is str:
            return "text"
        if self.kind is bool:
            return "true or false"
        noun = "an integer" if self.kind is int else "a finite number"
        bounds = self.bounds()
        number = f"{noun} {'of ' if bounds.startswith('at ') else ''}{bounds}".rstrip()
        return " or ".join((number, *self.words))

    def bounds(self) -> str:
        """The numeric range alone: 'from 1 to 999', 'at least 0', 'above 0' ('' when unbounded)."""
        low, high = _figure(self.low), _figure(self.high)
        if self.low is not None and self.high is not None:
            return f"above {low} and at most {high}" if self.above else f"from {low} to {high}"
        if self.low is not None:
            return f"above {low}" if self.above else f"at least {low}"
        return "" if self.high is None else f"at most {high}"

    def check(self, value: Any) -> Any:
        """`value` if it is valid for this option (a tuple of them for `many`); else ValueError('must be ...')."""
        if not self.many:
            return self._check_one(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be {self.describe()}")
        return tuple(map(self._check_one, value))

    def _check_one(self, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be {self.describe()}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.allowed and value not in self.allowed):
                raise ValueError(f"must be {self.describe()}")
            return value
        if value in self.words:
            return value
        number_types = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise ValueError(f"must be {self.describe()}")
        if not math.isfinite(value) or not self._in_range(value):
            raise ValueError(f"must be {self.describe()}")
        return self.kind(value)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def parse(self, given: Any) -> Any:
        """A flag's text (or its default) as a checked value; OptionError names the flag and what it takes."""
        value = given
        if isinstance(given, str) and self.kind in (int, float) and given not in self.words:
            try:
                value = self.kind(given)
            except ValueError:
                value = given
        try:
            return self.check(value)
        except ValueError as error:
            shown = given if isinstance(given, str) and given.strip() else repr(given)
            raise OptionError(f"{self.flag} {error}, not {shown}", self.why or None) from None


def _figure(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def check_fields(options: dict[str, Option], values: dict[str, Any], where: str) -> None:
    """Check named values (a dataclass's fields, a sidecar's record) against their declarations."""
    for name, value in values.items():
        option = options.get(name)
        if option is None or (value is None and option.default is None):
            continue
        try:
            option.check(value)
        except ValueError as error:
            raise OptionError(f"{where}: {name} {error}, not {value!r}", option.why or None) from None
