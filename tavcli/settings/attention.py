"""Attention control of an edit (`AttentionSettings`, docs/method.md "Attention control"): its options, the steps
they control, and the rules that refuse what would change nothing or cannot be done. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from tavcli.choices import AttentionSource, BlendMaps, SelfAttention, WordMap
from tavcli.settings.declared import FLAGS, Declared, Names, plain_zeros
from tavcli.settings.option import Option, OptionError, check_fields
from tavcli.settings.options import EDIT
from tavcli.settings.sampling import EditSettings, InversionSettings
from tavcli.words import prompt_words

__all__ = ["REWEIGHT_MAX", "AttentionSettings"]

REWEIGHT_MAX = 10.0


@dataclass(frozen=True, kw_only=True)
class AttentionSettings(Declared):
    """Attention control of an edit (docs/method.md, "Attention control"), each field the `tav edit` option of
    its name in `EDIT`; off at the defaults (then no field is in an edit's key)."""

    OPTIONS: ClassVar[Mapping[str, Option]] = EDIT
    cross_replace: float = EDIT["cross_replace"].default
    self_replace: float = EDIT["self_replace"].default
    self_attention: SelfAttention = EDIT["self_attention"].default
    word_map: WordMap = EDIT["word_map"].default
    reweight: tuple[str, ...] = EDIT["reweight"].default  # WORD=SCALE
    blend_source: tuple[str, ...] = EDIT["blend_source"].default
    blend_edit: tuple[str, ...] = EDIT["blend_edit"].default
    blend_maps: BlendMaps = EDIT["blend_maps"].default
    attention_from: AttentionSource = EDIT["attention_from"].default

    def __post_init__(self) -> None:
        plain_zeros(self)
        # A list from typer or a batch file; blend words are a set (their maps are summed), in one order.
        object.__setattr__(self, "reweight", tuple(self.reweight or ()))
        for name in ("blend_source", "blend_edit"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name) or ()))))
        check_fields(EDIT, asdict(self), "attention control")

    @property
    def active(self) -> bool:
        """Whether the edit is controlled at all."""
        return self.cross_replace > 0 or self.self_replace > 0 or bool(self.blend_source or self.blend_edit)

    def changed(self) -> dict[str, Any]:
        """The fields away from their defaults, by name (what keys, sidecars and reproduce commands record)."""
        return {name: value for name, value in asdict(self).items() if value != EDIT[name].default}

    def weights(self, names: Names = FLAGS) -> dict[str, float]:
        """`--reweight WORD=SCALE` as {word: scale}."""
        weights: dict[str, float] = {}
        for given in self.reweight:
            word, _, scale = given.rpartition("=")
            try:
                value = float(scale)
            except ValueError:
                value = math.nan
            if not word.strip() or not 0 <= value <= REWEIGHT_MAX:
                raise OptionError(
                    f"{names('reweight')} takes WORD=SCALE with a scale from 0 to {REWEIGHT_MAX:g}, not {given!r}",
                    "e.g. --reweight sunset=3",
                )
            # Words match whatever their case and punctuation ("PANDA," is "panda"): one scale per word.
            again = [earlier for earlier in weights if set(prompt_words(earlier)) & set(prompt_words(word))]
            if again:
                raise OptionError(
                    f"{names('reweight')} scales {word.strip()!r} twice (also as {again[0]!r})",
                    "give each word one scale",
                )
            weights[word.strip()] = value
        return weights

    def controlled_steps(self, name: str, steps: int) -> int:
        """The steps of `steps` that `cross_replace` or `self_replace` (`name`) controls, counted as Video-P2P's and
        FateZero's code counts them: cross-attention int(c (N + 1)) (their table of N + 1 rows), at most N;
        self-attention int(s N); both in floating point (0.29 of 100 self-attention steps is 28)."""
        if name == "cross_replace":
            return min(int(self.cross_replace * (steps + 1)), steps)
        return int(self.self_replace * steps)

    def check(
        self,
        settings: EditSettings,
        inversion: InversionSettings,
        prompts: list[str],
        names: Names,
        invert_steps: int | None = None,
        inversion_names: Names | None = None,
    ) -> None:
        """Refuse, in one line, what would change nothing or cannot be done: a control option without the
        control it belongs to, a branch without an inversion that re-creates the clip (or with DDIM noise),
        trajectory maps from an inversion of other steps, and an edit-prompt word a prompt lacks.
        `inversion_names` names the inversion's fields (a batch job's `invert` table)."""
        inversion_names = inversion_names or names
        changed = self.changed()
        needs = {
            "reweight": ("cross_replace",),
            "word_map": ("cross_replace",),
            "self_attention": ("self_replace",),
            "blend_maps": ("blend_edit", "cross_replace"),
        }
        for name, needed in needs.items():
            for other in needed:
                if name in changed and other not in changed:
                    raise OptionError(f"{names(name)} applies to {names(other)}: give it too")
        if "attention_from" in changed and not self.active:
            raise OptionError(
                f"{names('attention_from')} applies to attention control: give {names('cross_replace')}, "
                f"{names('self_replace')} or {names('blend_source')} too"
            )
        if not self.active:
            return
        for name, rows in (("cross_replace", settings.steps + 1), ("self_replace", settings.steps)):
            fraction = getattr(self, name)
            if fraction > 0 and self.controlled_steps(name, settings.steps) == 0:
                raise OptionError(
                    f"{names.given(name, fraction)} of {settings.steps} steps controls none of them",
                    f"give at least {math.ceil(1000 / rows) / 1000:g}, or more {names('steps')}",
                )
        given = names.given("attention_from", self.attention_from)
        if self.attention_from == "branch":
            if not inversion.reconstructs:
                raise OptionError(
                    f"{given} samples the source beside the edit, which needs an inversion that gives it back",
                    f"give {inversion_names.given('inversion', 'null-text')} or negative-prompt",
                )
            if settings.eta > 0:
                raise OptionError(f"{given} retraces deterministic DDIM: {names('eta')} must be 0")
        elif invert_steps not in (None, settings.steps):
            raise OptionError(
                f"{given} replays the inversion's calls step for step: its steps ({invert_steps}) must be the "
                f"edit's ({settings.steps})"
            )
        for prompt in prompts:
            _require_words(prompt, "blend_edit", self.blend_edit, names)
            _require_words(prompt, "reweight", tuple(self.weights(names)), names)

    def check_source(self, source: str, names: Names = FLAGS) -> None:
        """Refuse a source blend word that the source prompt lacks, in one line naming its words."""
        _require_words(source, "blend_source", self.blend_source, names, "the source prompt ")


def _require_words(prompt: str, name: str, given: tuple[str, ...], names: Names, whose: str = "") -> None:
    """Refuse, naming the prompt's words, a word of `given` (option `name`'s) that `prompt` lacks."""
    words = prompt_words(prompt)
    for word in given:
        if not prompt_words(word) or any(part not in words for part in prompt_words(word)):
            raise OptionError(
                f"{names.given(name, word)}: {word!r} is not a word of {whose}{prompt!r}",
                f"its words are: {', '.join(dict.fromkeys(words))}",
            )
