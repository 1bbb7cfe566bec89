"""Settings dataclasses made from the option declarations (`tavcli.settings.options`): their fields read from
values given by option name, checked, and keyed by field name; and how a rule between options names them (as
flags or as a batch file's fields). Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from tavcli.settings.option import Option, check_fields

__all__ = ["FLAGS", "Declared", "Names", "check_settings", "keyed_fields", "named_fields", "plain_zeros"]


@dataclass(frozen=True)
class Names:
    """How a rule's message names the options it concerns: as the command line's flags (`--start`), or as
    a batch file's fields (`'edit.start'`), so that one rule serves both."""

    table: str | None = None  # None: flags; "" a batch job's top level; "edit" or "invert" one of its tables

    def __call__(self, name: str) -> str:
        """`--preview-every`, or `field 'preview_every'`."""
        if self.table is None:
            return "--" + name.replace("_", "-")
        return f"field '{self.table + '.' if self.table else ''}{name}'"

    def given(self, name: str, value: object) -> str:
        """An option with its value: `--start 48`, or `field 'edit.start' = 48`."""
        return f"{self(name)} {value}" if self.table is None else f"{self(name)} = {value}"

    def wanted(self, name: str, metavar: str) -> str:
        """An option to add: `--preview PROMPT`, or `field 'preview'`."""
        return f"{self(name)} {metavar}" if self.table is None else self(name)


FLAGS = Names()


def plain_zeros(settings: Any) -> None:
    """Make a float field's -0.0 (`--guidance -0`) 0.0: the same setting, so it must not key apart."""
    for setting in fields(settings):
        value = getattr(settings, setting.name)
        if isinstance(value, float) and value == 0:
            object.__setattr__(settings, setting.name, 0.0)


def _declarations(settings: Any, options: Mapping[str, Option]) -> dict[str, Option]:
    """The declarations of `settings`' fields (a settings dataclass or its type), by field name."""
    names = {setting.name for setting in fields(settings)}
    return {option.attribute: option for option in options.values() if option.attribute in names}


def named_fields(settings: type[Any], options: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `settings`' fields among `values` given by option name (`lr`), by field name
    (`learning_rate`); each one missing takes its default."""
    declared = _declarations(settings, options)
    return {field: values[option.name] for field, option in declared.items() if option.name in values}


def check_settings(options: Mapping[str, Option], settings: Any, where: str) -> None:
    """Check a settings dataclass's fields against their declarations, naming each by its option's name."""
    declared = _declarations(settings, options)
    check_fields(dict(options), {option.name: getattr(settings, f) for f, option in declared.items()}, where)


def keyed_fields(options: Mapping[str, Option], settings: Any) -> dict[str, Any]:
    """The fields of `settings` in a cache key, by field name: those `keyed`, except a `key_omits_default` one
    at its default (so that keys made before it existed stay)."""
    declared = _declarations(settings, options)
    values = {field: getattr(settings, field) for field, option in declared.items() if option.keyed}
    return {f: v for f, v in values.items() if not (declared[f].key_omits_default and v == declared[f].default)}


SettingsT = TypeVar("SettingsT", bound="Declared")


class Declared:
    """A settings dataclass whose fields are the options `OPTIONS` declares (a field is the option whose
    `attribute` it is): made from values given by option name with `named`."""

    OPTIONS: ClassVar[Mapping[str, Option]]

    @classmethod
    def named(cls: type[SettingsT], values: Mapping[str, Any]) -> SettingsT:
        """The settings among `values` (a batch job's fields or table, a sidecar's record), by option name."""
        return cls(**named_fields(cls, cls.OPTIONS, values))
