"""The options of attention control on `tav edit` (docs/method.md, "Attention control"), declared once; part of
`tavcli.settings.options.EDIT`. Torch-free."""

from __future__ import annotations

from tavcli.choices import AttentionSource, BlendMaps, SelfAttention, WordMap, choices
from tavcli.settings.option import Option

__all__ = ["ATTENTION"]

# Attention control (`tav edit`; docs/method.md, "Attention control"): all off at their defaults.
ATTENTION = (
    Option(
        "--cross-replace",
        float,
        0.0,
        "The edit's cross-attention maps are the source's for this fraction of the steps (Prompt-to-Prompt; "
        "Video-P2P uses 0.2, FateZero's style edits 0.8); 0: off.",
        low=0,
        high=1,
        value_name="FRACTION",
        key_omits_default=True,
    ),
    Option(
        "--self-replace",
        float,
        0.0,
        "The edit's self-attention maps are the source's for this fraction of the steps (0.5 in Video-P2P and "
        "FateZero): keeps the source's structure and motion; 0: off.",
        low=0,
        high=1,
        value_name="FRACTION",
        key_omits_default=True,
    ),
    Option(
        "--self-attention",
        str,
        "temporal",
        "The self-attention --self-replace takes: temporal (attn_temp, Video-P2P's), spatial (sparse-causal attn1 "
        "in layers of at most a quarter of the latent's size, FateZero's), or both.",
        allowed=choices(SelfAttention),
        key_omits_default=True,
    ),
    Option(
        "--word-map",
        str,
        "auto",
        "How the edit prompt's tokens take the source's cross-attention: replace (a word swap: equal token "
        "counts), refine (the shared words aligned, new words keep their own); auto: replace for equal counts.",
        allowed=choices(WordMap),
        key_omits_default=True,
    ),
    Option(
        "--reweight",
        str,
        (),
        "Scale an edit-prompt word's cross-attention while --cross-replace replaces it (Video-P2P uses 2 to 5); "
        "repeatable.",
        value_name="WORD=SCALE",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-source",
        str,
        (),
        "Local blend: the edit keeps the source outside the region this word of the source prompt attends to "
        "(with --attention-from trajectory it also fuses self-attention by it, FateZero's); repeatable.",
        value_name="WORD",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-edit",
        str,
        (),
        "Local blend: the edited region also takes in where this word of each edit prompt attends; repeatable.",
        value_name="WORD",
        key_omits_default=True,
        many=True,
    ),
    Option(
        "--blend-maps",
        str,
        "auto",
        "The --blend-edit words' maps while --cross-replace replaces them: replaced (the maps the edit is given, "
        "Video-P2P's), own (the edit's own, FateZero's); auto: replaced with --attention-from branch, own with "
        "trajectory.",
        allowed=choices(BlendMaps),
        key_omits_default=True,
    ),
    Option(
        "--attention-from",
        str,
        "trajectory",
        "The source's attention: trajectory (recomputed from the cached inversion at each step: FateZero's maps, "
        "nothing stored) or branch (the source sampled beside the edit, Video-P2P's; needs --inversion null-text "
        "or negative-prompt).",
        allowed=choices(AttentionSource),
        key_omits_default=True,
    ),
)
