"""Words and tokens of prompts, for attention control: which text tokens a word is, and how an edit prompt's
tokens take the source prompt's cross-attention (Prompt-to-Prompt's word swap and refinement, with its global
alignment of the token sequences; docs/method.md, "Attention control")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tavcli.errors import TavError
from tavcli.words import bare_word, prompt_words

__all__ = ["TokenMap", "WordMapMode", "align_tokens", "token_map", "word_tokens"]

WordMapMode = Literal["replace", "refine"]


def word_tokens(tokenizer: Any, prompt: str, words: tuple[str, ...] | list[str]) -> list[int]:
    """The positions in `prompt`'s token sequence (0 is the start token) of the tokens of `words` (each may be
    several words, "red car"); one line naming the prompt's words when one is not among them."""
    positions: dict[str, list[int]] = {}
    at = 1  # after the start token; CLIP tokenizes each space-separated part on its own
    for part in prompt.split():
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(part, add_special_tokens=False).input_ids)
        wordy = [
            at + i for i, token in enumerate(tokens) if re.search(r"\w", token.removesuffix("</w>"))
        ]  # not "skiing."'s "."
        positions.setdefault(bare_word(part), []).extend(wordy)
        at += len(tokens)
    limit = tokenizer.model_max_length - 1  # the end token's place at the latest
    chosen: list[int] = []
    for given in words:
        for word in prompt_words(given) or [given]:
            if word not in positions:
                raise TavError(
                    f"{word!r} is not a word of {prompt!r}",
                    f"its words are: {', '.join(dict.fromkeys(prompt_words(prompt)))}",
                )
            inside = [p for p in positions[word] if p < limit]
            if not inside:
                raise TavError(f"{word!r} is past the text encoder's {limit} tokens in {prompt!r}")
            chosen.extend(inside)
    return sorted(set(chosen))


@dataclass(frozen=True)
class TokenMap:
    """How an edit's cross-attention takes the source's, token by token (length: the text encoder's tokens).

    Edit token j takes the source's map of token `source[j]` with weight `alpha[j]` (1: the source's, 0: its
    own), then `weight[j]` scales it (reweighting):

        P[:, j] = weight[j] * (alpha[j] * P_src[:, source[j]] + (1 - alpha[j]) * P_edit[:, j])
    """

    source: torch.Tensor  # (tokens,) int64
    alpha: torch.Tensor  # (tokens,) float32
    weight: torch.Tensor  # (tokens,) float32
    mode: WordMapMode

    @property
    def taken(self) -> torch.Tensor:
        """alpha * weight: how much of the source's map each token takes."""
        return self.alpha * self.weight

    @property
    def own(self) -> torch.Tensor:
        """(1 - alpha) * weight: how much of its own map each token keeps (zero for a word swap)."""
        return (1 - self.alpha) * self.weight

    def to(self, device: torch.device) -> TokenMap:
        """The same map on `device` (once per edit, not per layer)."""
        return TokenMap(self.source.to(device), self.alpha.to(device), self.weight.to(device), self.mode)


def token_map(
    tokenizer: Any,
    source_prompt: str,
    edit_prompt: str,
    mode: WordMapMode | None,
    weights: dict[str, float] | None = None,
) -> TokenMap:
    """The map from `source_prompt`'s tokens to `edit_prompt`'s: `replace` (a word swap: token j takes token j's
    map; equal token counts), `refine` (the token sequences globally aligned, `align_tokens`: aligned tokens take
    the source's maps, new tokens keep their own, the padding after the end token takes the source's padding at
    the same position, as Prompt-to-Prompt's `get_mapper`), or None: replace for equal token counts, else
    refine. Replace with unequal counts is refine (the caller says so: `TokenMap.mode`). `weights` scale the
    maps of the edit prompt's words."""
    length = tokenizer.model_max_length
    source_ids, edit_ids = (_ids(tokenizer, prompt) for prompt in (source_prompt, edit_prompt))
    if mode is None or mode == "replace":
        mode = "replace" if len(source_ids) == len(edit_ids) else "refine"
    source = torch.arange(length)
    alpha = torch.ones(length)
    if mode == "refine":
        for position, aligned in enumerate(align_tokens(source_ids, edit_ids)):
            if aligned is None:
                alpha[position] = 0.0  # a new token: its own map
            else:
                source[position] = aligned
    weight = torch.ones(length)
    for word, scale in (weights or {}).items():
        weight[word_tokens(tokenizer, edit_prompt, [word])] = scale
    return TokenMap(source, alpha, weight, mode)


def align_tokens(source: list[int], edit: list[int]) -> list[int | None]:
    """For each edit token, the position of the source token it is aligned with, or None for a new token.

    Needleman-Wunsch global alignment as Prompt-to-Prompt scores it (match 1, mismatch -1, gap 0; so it aligns a
    longest common subsequence and never a mismatch), ties broken as its code breaks them: a gap in the source
    before a gap in the edit before a match. Where a token repeats ("a man is skiing at sunset" -> "a man is
    surfing at the beach at sunset"), which of the equal alignments is taken changes the maps."""
    rows, cols = len(source) + 1, len(edit) + 1
    score = [[0] * cols for _ in range(rows)]
    move = [["edit"] * cols for _ in range(rows)]  # row 0: only edit tokens left
    for i in range(1, rows):
        move[i][0] = "source"
        for j in range(1, cols):
            new_edit, dropped_source = score[i][j - 1], score[i - 1][j]  # gaps cost nothing
            matched = score[i - 1][j - 1] + (1 if source[i - 1] == edit[j - 1] else -1)
            score[i][j] = max(new_edit, dropped_source, matched)
            if score[i][j] == new_edit:
                move[i][j] = "edit"
            elif score[i][j] == dropped_source:
                move[i][j] = "source"
            else:
                move[i][j] = "match"
    aligned: list[int | None] = [None] * len(edit)
    i, j = len(source), len(edit)
    while i > 0 or j > 0:
        step = move[i][j]
        if step == "match":
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == "edit":
            j -= 1
        else:
            i -= 1
    return aligned


def _ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids with the start and end tokens, cut at the text encoder's length."""
    ids: list[int] = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return ids
