"""The words of a prompt as attention control names them (`--blend-source man`): a leaf, so that requests
check words before anything heavy loads and the method finds their tokens alike."""

from __future__ import annotations

import re

__all__ = ["bare_word", "prompt_words"]


def bare_word(text: str) -> str:
    """A word as given or as written in a prompt: lower case, punctuation dropped ("Skiing." -> "skiing", "'man'"
    -> "man"); an apostrophe or hyphen inside a word stays ("don't", "t-shirt")."""
    return re.sub(r"[^\w'-]+", "", text.lower()).strip("'-")


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt, in order: its space-separated parts, bare, that have a letter or digit (a lone "-"
    or "'" is no word: it has no token of its own to attend to)."""
    return [word for word in map(bare_word, prompt.split()) if re.search(r"\w", word)]
