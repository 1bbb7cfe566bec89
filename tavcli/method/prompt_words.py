"""Words and tokens of prompts, for attention control: which text tokens a word is, and how an edit prompt's
tokens take the source prompt's cross-attention (Prompt-to-Prompt's word swap and refinement; docs/method.md,
"Attention control")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Literal

import torch

from tavcli.errors import TavError
from tavcli.words import bare_word, prompt_words

__all__ = ["TokenMap", "WordMapMode", "token_map", "word_tokens"]

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
    map; equal token counts), `refine` (the longest common runs of tokens aligned, new tokens keep their own
    maps), or None: replace for equal token counts, else refine. Replace with unequal counts is refine (the
    caller says so: `TokenMap.mode`). `weights` scale the maps of the edit prompt's words."""
    length = tokenizer.model_max_length
    source_ids, edit_ids = (_ids(tokenizer, prompt) for prompt in (source_prompt, edit_prompt))
    if mode is None or mode == "replace":
        mode = "replace" if len(source_ids) == len(edit_ids) else "refine"
    source = torch.arange(length)
    alpha = torch.ones(length)
    if mode == "refine":
        alpha[: len(edit_ids)] = 0.0
        matcher = SequenceMatcher(None, source_ids, edit_ids, autojunk=False)
        for block in matcher.get_matching_blocks():
            for offset in range(block.size):
                source[block.b + offset] = block.a + offset
                alpha[block.b + offset] = 1.0
        # Padding after the end token: the source's padding, shifted by the difference in length.
        padding = torch.arange(len(edit_ids), length)
        shifted = padding - len(edit_ids) + len(source_ids)
        source[padding] = shifted.clamp(max=length - 1)
        alpha[padding] = (shifted < length).float()
    weight = torch.ones(length)
    for word, scale in (weights or {}).items():
        weight[word_tokens(tokenizer, edit_prompt, [word])] = scale
    return TokenMap(source, alpha, weight, mode)


def _ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids with the start and end tokens, cut at the text encoder's length."""
    ids: list[int] = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return ids
