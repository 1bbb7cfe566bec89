"""Attention control for one group of an edit: its settings resolved against the model's tokenizer, the
source prompt and the cached inversion into the method's schedule, control and steering
(`tavcli.method.attention_control`, `tavcli.method.controlled_sampling`)."""

from __future__ import annotations

from typing import Any

import torch

from tavcli.method.attention_control import AttentionControl, ControlSchedule, SelfKind
from tavcli.method.controlled_sampling import AttentionSteering, SourceBranch, SourceTrajectory
from tavcli.method.local_blend import LocalBlend
from tavcli.method.prompt_words import TokenMap, token_map, word_tokens
from tavcli.method.windows import call_spans
from tavcli.models.source import Components
from tavcli.settings.attention import AttentionSettings
from tavcli.settings.sampling import EditSettings
from tavcli.store.specs import LoraIdentity
from tavcli.workflow.plans import EditPlan
from tavcli.workflow.session import Session, prompt_embeddings

__all__ = ["attention_steering"]

SELF_KINDS: dict[str, frozenset[SelfKind]] = {
    "temporal": frozenset({"temporal"}),
    "spatial": frozenset({"spatial"}),
    "both": frozenset({"spatial", "temporal"}),
}


def attention_steering(
    session: Session,
    plan: EditPlan,
    group: list[str],
    settings: EditSettings,
    components: Components,
    unet: Any,
    loras: list[LoraIdentity] | None,
    trajectory: torch.Tensor,
    unconditional: torch.Tensor | list[torch.Tensor],
) -> tuple[AttentionControl, AttentionSteering]:
    """The control and the steering of a controlled edit of `group` (one UNet batch) on `unet` (windowed or
    not), from the inversion's `trajectory` and the edit's `unconditional` embeddings, as sampling loaded them.
    The source prompt is the inversion's (`plan_edit` inverts with the source prompt)."""
    attention, project = plan.attention, plan.project
    source_prompt = str(plan.inversion.spec["prompt"])
    frames = trajectory.shape[-3]
    device = session.runtime.device
    maps = tuple(_token_map(session, components.tokenizer, attention, source_prompt, p).to(device) for p in group)
    steps = settings.steps
    schedule = ControlSchedule(
        steps,
        cross_steps=attention.controlled_steps("cross_replace", steps),
        self_steps=attention.controlled_steps("self_replace", steps),
        self_kinds=SELF_KINDS[attention.self_attention],
        token_maps=maps,
        fuse_self=attention.attention_from == "trajectory" and bool(attention.blend_source),
        blend=_blend(components.tokenizer, attention, source_prompt, group, frames),
        blend_replaced=_blend_replaced(attention),
    )
    control = AttentionControl(schedule, call_spans(unet, frames))
    text = prompt_embeddings(session, project, components.source, [source_prompt], loras)
    source: SourceBranch | SourceTrajectory
    if attention.attention_from == "trajectory":
        source = SourceTrajectory(trajectory, text)
    else:  # the branch starts from the inverted noise, with the unconditional branch that gives the clip back
        # Null-text: its embedding per step, the edit's too; negative-prompt inversion: the source prompt's.
        source = SourceBranch(trajectory[-1], text, unconditional if isinstance(unconditional, list) else text)
    steering = AttentionSteering(unet, control, source, len(group), plan.guidance)
    return control, steering


def _token_map(session: Session, tokenizer: Any, attention: AttentionSettings, source: str, prompt: str) -> TokenMap:
    """How `prompt`'s tokens take the source's maps; a note when a word swap asked for cannot be one."""
    mode = None if attention.word_map == "auto" else attention.word_map
    mapped = token_map(tokenizer, source, prompt, mode, attention.weights())
    if attention.word_map == "replace" and mapped.mode == "refine":
        session.reporter.note(
            f"--word-map replace swaps words of equal token counts: {prompt!r} and the source {source!r} have "
            "different counts, so their shared words are aligned (refine)"
        )
    return mapped


def _blend_replaced(attention: AttentionSettings) -> bool:
    """Whether local blending reads the edit words' maps as replaced (Video-P2P's attention store keeps the maps
    its controller overwrites) or their own (FateZero's stores a copy first); `auto` follows the source."""
    if attention.blend_maps == "auto":
        return attention.attention_from == "branch"
    return attention.blend_maps == "replaced"


def _blend(
    tokenizer: Any, attention: AttentionSettings, source: str, group: list[str], frames: int
) -> LocalBlend | None:
    """The local blend of the blend words, or None without any."""
    if not (attention.blend_source or attention.blend_edit):
        return None
    source_tokens = word_tokens(tokenizer, source, attention.blend_source) if attention.blend_source else []
    edit_tokens = [
        word_tokens(tokenizer, prompt, attention.blend_edit) if attention.blend_edit else [] for prompt in group
    ]
    return LocalBlend(source_tokens, edit_tokens, frames)
