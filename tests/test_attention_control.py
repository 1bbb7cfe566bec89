"""Attention control (docs/method.md, "Attention control"): the processors against attention formed explicitly,
FateZero's stored maps against the ones recomputed from the trajectory, and the identities of docs/method.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from transformers import CLIPTokenizer

from tavcli.errors import TavError
from tavcli.method.attention_control import (
    AttentionControl,
    ControlledAttention,
    ControlSchedule,
    SelfKind,
    controlling,
)
from tavcli.method.controlled_sampling import AttentionSteering, SourceBranch, SourceTrajectory
from tavcli.method.inversion import ddim_inversion
from tavcli.method.local_blend import LocalBlend
from tavcli.method.prompt_words import TokenMap, align_tokens, token_map, word_tokens
from tavcli.method.sampling import Guidance, ddim_sample, ddim_schedule
from tavcli.method.video_unet import sparse_causal_context
from tavcli.method.windows import call_spans, windowed

from .conftest import TINY_SD

if TYPE_CHECKING:
    from tavcli.method.video_unet import VideoUNet

SOURCE = "a man is skiing"
STEPS = 4
BOTH: frozenset[SelfKind] = frozenset({"spatial", "temporal"})
GUIDANCE = Guidance(7.5)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")


@pytest.fixture(scope="module")
def trajectory(
    oracle_video_unet: VideoUNet, scheduler: DDIMScheduler, embed: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    torch.manual_seed(0)
    clean = torch.randn(1, 4, 5, 16, 16)
    return torch.stack(ddim_inversion(oracle_video_unet, scheduler, clean, embed(SOURCE), STEPS))


@dataclass(frozen=True)
class Rig:
    """What the sampling tests run on: the reference's tiny video UNet and scheduler, prompt embeddings, the
    source's inversion trajectory and the tokenizer."""

    unet: VideoUNet
    scheduler: DDIMScheduler
    embed: Callable[[str], torch.Tensor]
    trajectory: torch.Tensor
    tokenizer: CLIPTokenizer


@pytest.fixture(scope="module")
def rig(
    oracle_video_unet: VideoUNet,
    scheduler: DDIMScheduler,
    embed: Callable[[str], torch.Tensor],
    trajectory: torch.Tensor,
    tokenizer: CLIPTokenizer,
) -> Rig:
    return Rig(oracle_video_unet, scheduler, embed, trajectory, tokenizer)


# --- prompts' words and token maps ---------------------------------------------------------------------------


def test_a_word_swap_replaces_token_for_token_and_an_added_word_refines(tokenizer: CLIPTokenizer) -> None:
    swap = token_map(tokenizer, SOURCE, "a dog is skiing", None)
    assert swap.mode == "replace" and torch.equal(swap.source, torch.arange(77)) and bool((swap.alpha == 1).all())
    added = token_map(tokenizer, SOURCE, "a man is skiing at sunset", None)
    assert added.mode == "refine"
    edit_ids = tokenizer("a man is skiing at sunset").input_ids
    new = word_tokens(tokenizer, "a man is skiing at sunset", ["at", "sunset"])
    assert added.alpha[new].sum() == 0  # new words keep their own maps
    kept = [j for j in range(len(edit_ids)) if j not in new]
    source_ids = tokenizer(SOURCE).input_ids
    assert [source_ids[int(added.source[j])] for j in kept] == [edit_ids[j] for j in kept]  # aligned tokens
    assert bool((added.alpha[kept] == 1).all())
    forced = token_map(tokenizer, SOURCE, "a man is skiing at sunset", "replace")
    assert forced.mode == "refine"  # unequal token counts cannot be a word swap
    weighted = token_map(tokenizer, SOURCE, "a dog is skiing", None, {"dog": 3.0})
    dog = word_tokens(tokenizer, "a dog is skiing", ["dog"])
    assert bool((weighted.weight[dog] == 3).all()) and weighted.weight.sum() == 77 + 2 * len(dog)


def test_refine_aligns_tokens_as_prompt_to_prompts_global_alignment() -> None:
    """Needleman-Wunsch with Prompt-to-Prompt's scores (match 1, mismatch -1, gap 0) and its tie-breaking (traced
    back from the end, a new edit token before a dropped source token before a match): where a token repeats, the
    earliest copy is aligned. Source "<s> a man is skiing at sunset </s>" -> edit "<s> a man is surfing at the
    beach at sunset </s>" as integers: the source's "at" (4) takes the edit's first "at", not the one before
    "sunset" (the longest-common-run matching the earlier code used aligned that one)."""
    source, edit = [0, 1, 2, 3, 4, 5, 9], [0, 1, 2, 6, 4, 7, 8, 4, 5, 9]
    assert align_tokens(source, edit) == [0, 1, 2, None, 4, None, None, None, 5, 6]
    assert align_tokens([], [3, 3]) == [None, None] and align_tokens([3, 3], []) == []
    assert align_tokens([1, 2], [2, 1]) == [1, None]  # of two equal alignments, the one the traceback meets first
    for x, y in [([1, 2, 3], [3, 2, 1]), ([5, 5, 5], [5, 5]), ([1, 2, 1, 2], [2, 1, 2, 1, 2])]:
        aligned = [(j, i) for j, i in enumerate(align_tokens(x, y)) if i is not None]
        assert all(x[i] == y[j] for j, i in aligned)  # never a mismatch
        assert [i for _, i in aligned] == sorted({i for _, i in aligned})  # in order, each once
        assert len(aligned) == _common_subsequence(x, y)  # as many as can be


def _common_subsequence(x: list[int], y: list[int]) -> int:
    """The length of the longest common subsequence of x and y."""
    lengths = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            lengths[i + 1][j + 1] = lengths[i][j] + 1 if a == b else max(lengths[i][j + 1], lengths[i + 1][j])
    return lengths[-1][-1]


def test_refine_maps_tokens_and_padding_as_the_references_mapper(tokenizer: CLIPTokenizer) -> None:
    """Prompt-to-Prompt's `get_mapper`: edit token j < len(edit) takes its aligned source token with alpha 1, or
    its own map (alpha 0); every padding position j >= len(edit) takes the source's position j, alpha 1."""
    edit = "a man is surfing at the beach at sunset"
    mapped = token_map(tokenizer, "a man is skiing at sunset", edit, "refine")
    source_ids, edit_ids = tokenizer("a man is skiing at sunset").input_ids, tokenizer(edit).input_ids
    aligned = align_tokens(source_ids, edit_ids)
    for j in range(77):
        i = aligned[j] if j < len(edit_ids) else j
        assert float(mapped.alpha[j]) == (0.0 if i is None else 1.0), j
        if i is not None:
            assert int(mapped.source[j]) == i, j
    first_at, second_at = (j for j, t in enumerate(edit_ids) if t == source_ids[5])
    assert float(mapped.alpha[first_at]) == 1 and int(mapped.source[first_at]) == 5
    assert float(mapped.alpha[second_at]) == 0  # the source's "at" is taken once, by the first


def test_a_word_not_in_the_prompt_is_one_line_naming_its_words(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(TavError) as raised:
        word_tokens(tokenizer, "a man is skiing.", ["dog"])
    assert "'dog' is not a word of 'a man is skiing.'" in str(raised.value)
    assert raised.value.hint is not None and "a, man, is, skiing" in raised.value.hint
    assert word_tokens(tokenizer, "A Man is skiing.", ["man", "SKIING"]) == [2, 4]
    assert word_tokens(tokenizer, "A Man is skiing.", ["'man'", "skiing!"]) == [2, 4]  # punctuation around a word
    quoted = word_tokens(tokenizer, "a 'man' is skiing", ["man"])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a 'man' is skiing").input_ids)
    assert "".join(tokens[p].removesuffix("</w>") for p in quoted) == "man"  # its tokens, not the quotes


# --- the processors against explicit probabilities -------------------------------------------------------------


def _explicit(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    heads = attn.heads
    qh, kh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    return (qh @ kh.transpose(-1, -2) * attn.scale).softmax(-1)  # (rows, heads, n, m)


def _apply(attn: Attention, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    vh = v.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    out = (probs @ vh).transpose(1, 2).flatten(2)
    projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
    return projected


def _controlled_call(
    kind: str,
    schedule: ControlSchedule,
    frames: int,
    hidden: torch.Tensor,
    text: torch.Tensor | None,
    latent_size: int = 4,
) -> tuple[Attention, torch.Tensor]:
    """Record item 0 of `hidden` (2 clips: source, edit), replay it onto item 1; the edit call's output. The
    layer is of a UNet on latents of `latent_size` squared (16 for a layer of 16 queries at the blend size)."""
    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=None if text is None else 12, heads=2, dim_head=8).eval()
    control = AttentionControl(schedule, [list(range(frames))])
    processor = ControlledAttention(None, control, kind, "layer")  # type: ignore[arg-type]
    sample = torch.zeros(2, 4, frames, latent_size, latent_size)
    with torch.no_grad():
        control.begin("record", record_item=0)
        control.on_call(None, (sample,), {})
        processor(attn, hidden, text)
        control.begin("replay", edit_items=(1,))
        control.on_call(None, (sample,), {})
        return attn, processor(attn, hidden, text)


def test_controlled_cross_attention_is_the_token_maps_formula(tokenizer: CLIPTokenizer) -> None:
    frames = 3
    torch.manual_seed(2)
    hidden, text = torch.randn(2 * frames, 16, 16), torch.randn(2 * frames, 77, 12)
    for edit in ("a dog is skiing", "a man is skiing at sunset"):
        tmap = token_map(tokenizer, SOURCE, edit, None, {"skiing": 2.5})
        schedule = ControlSchedule(STEPS, 1, 0, frozenset(), (tmap,))
        attn, out = _controlled_call("cross", schedule, frames, hidden, text)
        with torch.no_grad():
            q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
            p_src, p_edit = _explicit(attn, q[:frames], k[:frames]), _explicit(attn, q[frames:], k[frames:])
            alpha, weight = tmap.alpha, tmap.weight
            mixed = (alpha * p_src[..., tmap.source] + (1 - alpha) * p_edit) * weight  # docs/method.md's formula
            expected = _apply(attn, mixed, v[frames:])
            plain = _apply(attn, _explicit(attn, q, k), v)
        assert (out[frames:] - expected).abs().max() < 1e-5, edit
        assert (out[:frames] - plain[:frames]).abs().max() < 1e-5  # the source item is not changed
        assert (out[frames:] - plain[frames:]).abs().max() > 1e-3  # and the edit is


def test_local_blend_reads_the_maps_the_edit_is_given_as_video_p2ps_attention_store_does(
    tokenizer: CLIPTokenizer,
) -> None:
    """Video-P2P's attention store keeps the very tensor its controller then overwrites, so while cross-attention
    is replaced an edit word's blend map is P'[:, j] = w_j (a_j P_s[:, s_j] + (1 - a_j) P[:, j]), summed over the
    word's tokens and averaged over heads; FateZero's store copies first, so there it is the edit's own P[:, j]."""
    frames = 3
    torch.manual_seed(4)
    hidden, text = torch.randn(2 * frames, 16, 16), torch.randn(2 * frames, 77, 12)  # 4x4 of 16x16 latents
    cases = [
        ("a dog is skiing", ["dog"], {"dog": 2.5}),  # a word swap, reweighted: the source's "man" map, scaled
        ("a man is skiing at sunset", ["man", "sunset"], {"man": 3.0}),  # refine: "sunset" keeps its own map
    ]
    for edit, words, weights in cases:
        tmap = token_map(tokenizer, SOURCE, edit, None, weights)
        tokens = word_tokens(tokenizer, edit, words)
        maps = {}
        for replaced in (True, False):
            blend = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [tokens], frames)
            schedule = ControlSchedule(STEPS, 1, 0, frozenset(), (tmap,), blend=blend, blend_replaced=replaced)
            attn, _ = _controlled_call("cross", schedule, frames, hidden, text, latent_size=16)
            assert blend.edit_maps[0] is not None
            maps[replaced] = blend.edit_maps[0]
        with torch.no_grad():
            q, k = attn.to_q(hidden), attn.to_k(text)
            p_src, p_edit = _explicit(attn, q[:frames], k[:frames]), _explicit(attn, q[frames:], k[frames:])
        given = (tmap.alpha * p_src[..., tmap.source] + (1 - tmap.alpha) * p_edit) * tmap.weight
        for replaced, probabilities in ((True, given), (False, p_edit)):
            expected = probabilities[..., tokens].sum(-1).mean(1).unflatten(1, (4, 4))
            assert (maps[replaced] - expected).abs().max() < 1e-5, (edit, replaced)
        assert (maps[True] - maps[False]).abs().max() > 1e-2, edit


def test_fractions_count_steps_as_the_references_tables() -> None:
    """Video-P2P and FateZero replace cross-attention at step i while row i of a table of N + 1 rows says so, rows
    [0, int(c (N + 1))) (`get_time_words_attention_alpha`), and self-attention for i < int(N s); both products
    in floating point."""
    from tavcli.settings.attention import AttentionSettings

    for steps in range(1, 102, 7):
        for fraction in (0.05, 0.1, 0.2, 0.29, 0.3, 0.5, 0.6, 0.7, 0.8, 0.95, 1.0):
            rows = [row < int(fraction * (steps + 1)) for row in range(steps + 1)]
            settings = AttentionSettings(cross_replace=fraction, self_replace=fraction)
            assert settings.controlled_steps("cross_replace", steps) == sum(rows[:steps]), (steps, fraction)
            self_steps = len([i for i in range(steps) if i < int(steps * fraction)])
            assert settings.controlled_steps("self_replace", steps) == self_steps, (steps, fraction)
    settings = AttentionSettings(cross_replace=0.95, self_replace=0.29)
    assert settings.controlled_steps("cross_replace", 10) == 10  # int(10.45); floor(0.95 * 10) would be 9
    assert settings.controlled_steps("self_replace", 100) == 28  # int(28.999999999999996), not 29


def test_controlled_self_attention_takes_the_source_maps_over_the_edits_values() -> None:
    frames = 4
    torch.manual_seed(3)
    schedule = ControlSchedule(STEPS, 0, 1, BOTH, ())
    # Temporal: rows are (clip, position), tokens the frames.
    hidden = torch.randn(2 * 16, frames, 16)
    attn, out = _controlled_call("temporal", schedule, frames, hidden, None)
    with torch.no_grad():
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        expected = _apply(attn, _explicit(attn, q[:16], k[:16]), v[16:])
    assert (out[16:] - expected).abs().max() < 1e-5
    # Spatial, sparse-causal: frame i's queries see frames 0 and i-1's keys.
    hidden = torch.randn(2 * frames, 4, 16)
    attn, out = _controlled_call("spatial", schedule, frames, hidden, None)
    with torch.no_grad():
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        keys, values = sparse_causal_context(k, frames), sparse_causal_context(v, frames)
        expected = _apply(attn, _explicit(attn, q[:frames], keys[:frames]), values[frames:])
    assert (out[frames:] - expected).abs().max() < 1e-5


# --- FateZero's stored maps, recomputed ------------------------------------------------------------------------


def _probabilities(control: AttentionControl, unet: VideoUNet) -> list[dict[str, torch.Tensor]]:
    """Each recorded call's attention probabilities by layer (what FateZero stores), from its queries and keys."""
    modules = dict(unet.named_modules())
    maps = []
    for call in control.recorded.values():
        by_layer = {}
        for name, (q, k) in call.kept.items():
            attn = modules[name.removesuffix(".processor")]
            if ".attn1." in name:
                k = sparse_causal_context(k, len(call.frames))
            by_layer[name] = _explicit(attn, q, k)
        maps.append(by_layer)
    return maps


@pytest.mark.parametrize("window", [None, 3])
def test_maps_recomputed_from_the_trajectory_are_those_stored_during_inversion(rig: Rig, window: int | None) -> None:
    oracle_video_unet, scheduler, embed, trajectory = rig.unet, rig.scheduler, rig.embed, rig.trajectory
    schedule = ControlSchedule(STEPS, STEPS, STEPS, BOTH, ())  # every layer that can be controlled, every step
    call = windowed(oracle_video_unet, window)
    control = AttentionControl(schedule, call_spans(call, 5))
    stored: list[list[dict[str, torch.Tensor]]] = []  # by inversion step and UNet call, as FateZero stores them

    def store(done: int, total: int) -> None:
        stored.append(_probabilities(control, oracle_video_unet))
        control.begin("record")

    with controlling(oracle_video_unet, control):
        control.begin("record")
        inverted = torch.stack(ddim_inversion(call, scheduler, trajectory[0], embed(SOURCE), STEPS, store))
        if window is None:
            assert torch.equal(inverted, trajectory)  # recording changes nothing
        steering = AttentionSteering(call, control, SourceTrajectory(inverted, embed(SOURCE)), 1, GUIDANCE)
        ddim, steps = ddim_schedule(scheduler, STEPS, torch.device("cpu"))
        for index, (timestep, step) in enumerate(zip(ddim.timesteps, steps, strict=True)):
            with torch.no_grad():
                steering.record_source(ddim, index, timestep, step)
            recomputed = _probabilities(control, oracle_video_unet)
            at_same_timestep = stored[STEPS - 1 - index]
            assert len(recomputed) == len(at_same_timestep) == (1 if window is None else 2)  # the windows' calls
            for again, kept in zip(recomputed, at_same_timestep, strict=True):
                # 16 transformer blocks: every cross and temporal layer, and the 11 spatial ones of at most a
                # quarter of the latent's tokens (8x8, 4x4 and 2x2 of 16x16)
                assert again.keys() == kept.keys() and len(again) == 16 + 16 + 11
                for name, probabilities in again.items():
                    assert (probabilities - kept[name]).abs().max() < 1e-6, (index, name)


class RecordingFirst(AttentionSteering):
    """The source's calls of each step all recorded before the edit's (what the steering does just in time)."""

    def begin(self, ddim: DDIMScheduler, index: int, timestep: torch.Tensor, step: int) -> None:
        self.record_source(ddim, index, timestep, step)
        self.control.begin("replay", edit_items=tuple(range(self.prompts, 2 * self.prompts)))


# --- identities ------------------------------------------------------------------------------------------------


class ConstantBlend(LocalBlend):
    """Local blending with a mask of one value everywhere (the identities' masks)."""

    def __init__(self, value: float, prompts: int) -> None:
        super().__init__([1], [[1]] * prompts, 5)
        self.value = value

    def mask(self, prompt: int, size: tuple[int, int]) -> torch.Tensor:
        return torch.full((self.frames, *size), self.value)


def _edit(
    rig: Rig,
    prompts: list[str],
    schedule: ControlSchedule | None,
    source: SourceBranch | SourceTrajectory | None = None,
    window: int | None = None,
    steering: type[AttentionSteering] = AttentionSteering,
    guidance: Guidance = GUIDANCE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edits of `prompts` (one batch), negative-prompt style, and the source branch's final latents."""
    noise = rig.trajectory[-1].expand(len(prompts), -1, -1, -1, -1)
    texts = torch.cat([rig.embed(p) for p in prompts])
    negative = rig.embed(SOURCE).expand_as(texts)
    call = windowed(rig.unet, window)
    if schedule is None:
        return ddim_sample(call, rig.scheduler, noise, texts, negative, STEPS, guidance), None
    frames = 5
    control = AttentionControl(schedule, call_spans(call, frames))
    source = source or SourceTrajectory(rig.trajectory, rig.embed(SOURCE))
    steered = steering(call, control, source, len(prompts), guidance)
    with controlling(rig.unet, control):
        out = ddim_sample(call, rig.scheduler, noise, texts, negative, STEPS, guidance, steering=steered)
    return out, steered.source_latents


def _schedule(tokenizer: CLIPTokenizer, prompts: list[str], **changes: object) -> ControlSchedule:
    maps: tuple[TokenMap, ...] = tuple(token_map(tokenizer, SOURCE, p, None) for p in prompts)
    settings: dict[str, object] = {"cross_steps": 2, "self_steps": 3, "self_kinds": BOTH, **changes}
    return ControlSchedule(STEPS, token_maps=maps, **settings)  # type: ignore[arg-type]


def test_no_control_changes_nothing_and_the_processors_are_restored(rig: Rig) -> None:
    before = {name: type(p) for name, p in rig.unet.attn_processors.items()}
    prompts = ["a dog is skiing"]
    plain, _ = _edit(rig, prompts, None)
    idle, _ = _edit(rig, prompts, _schedule(rig.tokenizer, prompts, cross_steps=0, self_steps=0))
    assert torch.equal(plain, idle)
    controlled, _ = _edit(rig, prompts, _schedule(rig.tokenizer, prompts))
    assert (controlled - plain).abs().max() > 1e-3
    assert {name: type(p) for name, p in rig.unet.attn_processors.items()} == before


def test_the_source_prompt_fully_replaced_gives_the_source_branch(rig: Rig) -> None:
    branch = SourceBranch(rig.trajectory[-1], rig.embed(SOURCE), rig.embed(SOURCE))
    schedule = _schedule(rig.tokenizer, [SOURCE], cross_steps=STEPS, self_steps=STEPS)
    out, source = _edit(rig, [SOURCE], schedule, branch)
    assert source is not None and (out - source).abs().max() < 1e-5


def test_a_blend_mask_of_ones_changes_nothing_and_of_zeros_gives_the_source(rig: Rig) -> None:
    prompts, tokenizer, trajectory, embed = ["a dog is skiing"], rig.tokenizer, rig.trajectory, rig.embed
    args = (rig, prompts)
    controlled, _ = _edit(*args, _schedule(tokenizer, prompts))
    ones, _ = _edit(*args, _schedule(tokenizer, prompts, blend=ConstantBlend(1.0, 1)))
    assert (ones - controlled).abs().max() < 5e-5  # x_src + 1 * (x - x_src): x, rounded
    zeros, _ = _edit(*args, _schedule(tokenizer, prompts, blend=ConstantBlend(0.0, 1)))
    assert (zeros - trajectory[0]).abs().max() < 1e-6  # the trajectory's source: the clip's own latents
    branch = SourceBranch(trajectory[-1], embed(SOURCE), embed(SOURCE))
    zeros, source = _edit(*args, _schedule(tokenizer, prompts, blend=ConstantBlend(0.0, 1)), branch)
    assert source is not None and (zeros - source).abs().max() < 1e-6
    real = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [word_tokens(tokenizer, prompts[0], ["dog"])], 5)
    blended, _ = _edit(*args, _schedule(tokenizer, prompts, blend=real, fuse_self=True))
    assert torch.isfinite(blended).all() and (blended - controlled).abs().max() > 1e-4
    assert set(real.mask(0, (16, 16)).unique().tolist()) <= {0.0, 1.0}  # a region (the random model's is wide)


def test_batch_size_and_windows_do_not_change_the_controlled_result(rig: Rig) -> None:
    prompts, tokenizer = ["a dog is skiing", "a man is skiing at sunset"], rig.tokenizer
    args = (rig,)

    words = {"a dog is skiing": ["dog"], "a man is skiing at sunset": ["sunset"]}

    def blend(chosen: list[str]) -> LocalBlend:
        edits = [word_tokens(tokenizer, p, words[p]) for p in chosen]
        return LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), edits, 5)

    together, _ = _edit(*args, prompts, _schedule(tokenizer, prompts, blend=blend(prompts), fuse_self=True))
    for number, prompt in enumerate(prompts):
        alone, _ = _edit(*args, [prompt], _schedule(tokenizer, [prompt], blend=blend([prompt]), fuse_self=True))
        assert (alone[0] - together[number]).abs().max() < 1e-4, prompt
    whole, _ = _edit(*args, prompts[:1], _schedule(tokenizer, prompts[:1]))
    wide, _ = _edit(*args, prompts[:1], _schedule(tokenizer, prompts[:1]), window=8)
    assert (whole - wide).abs().max() < 1e-6  # a window holding the clip is no window
    just_in_time, _ = _edit(*args, prompts[:1], _schedule(tokenizer, prompts[:1]), window=3)
    first, _ = _edit(*args, prompts[:1], _schedule(tokenizer, prompts[:1]), window=3, steering=RecordingFirst)
    assert torch.equal(just_in_time, first)  # each window replays its own source window, call for call
    assert (just_in_time - whole).abs().max() > 1e-4  # and windows are windows


def test_a_controlled_edit_rounds_under_bf16_autocast_like_a_plain_one(rig: Rig) -> None:
    prompts, tokenizer = ["a dog is skiing"], rig.tokenizer
    args = (rig, prompts)

    def schedule() -> ControlSchedule:
        blend = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [word_tokens(tokenizer, prompts[0], ["dog"])], 5)
        return _schedule(tokenizer, prompts, blend=blend, fuse_self=True)

    exact_plain, exact = _edit(*args, None)[0], _edit(*args, schedule())[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # records and replays in bf16, masks and maps in float32
        rounded_plain, rounded = _edit(*args, None)[0], _edit(*args, schedule())[0]
    assert torch.isfinite(rounded).all()
    plain_error = (rounded_plain.float() - exact_plain).abs().mean()
    assert (rounded.float() - exact).abs().mean() < 3 * plain_error  # bf16's own rounding, not the control's


# --- one guidance for every sampler ---------------------------------------------------------------------------


def test_the_edit_settings_guidance_reaches_sampling_the_source_branch_and_the_null_text_fit_alike(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, guidance_calls: list[tuple[str, Guidance]]
) -> None:
    """One `Guidance` made from the edit settings by name (`guidance_of`) is what plain sampling, attention
    control's source branch and the null-text fit each apply, every step; a setting changed in it alone (the
    rescale) changes all three results."""
    from tavcli.method.null_text import NullTextRun, optimise_null_text
    from tavcli.settings.sampling import EditSettings
    from tavcli.workflow.plans import guidance_of

    plain_guidance = guidance_of(EditSettings(guidance=7.5))
    rescaled = guidance_of(EditSettings(guidance=7.5, guidance_rescale=0.7))
    assert (plain_guidance, rescaled) == (Guidance(7.5), Guidance(7.5, guidance_rescale=0.7))
    prompts = ["a dog is skiing"]
    schedule = _schedule(rig.tokenizer, prompts)
    branch = SourceBranch(rig.trajectory[-1], rig.embed(SOURCE), rig.embed(""))

    def results(guidance: Guidance) -> dict[str, torch.Tensor]:
        plain, _ = _edit(rig, prompts, None, guidance=guidance)
        _, source = _edit(rig, prompts, schedule, branch, guidance=guidance)
        assert source is not None
        run = NullTextRun(guidance=guidance, iterations=2, learning_rate=0.1)
        fit = optimise_null_text(rig.unet, rig.scheduler, list(rig.trajectory), rig.embed(SOURCE), rig.embed(""), run)
        return {"edit": plain, "branch": source, "null-text": torch.stack(fit.embeddings)}

    applied = guidance_calls  # every `Guidance.apply` until `monkeypatch.undo()`
    with_rescale = results(rescaled)
    assert {consumer for consumer, _ in applied} == {"edit", "branch", "null-text"}
    assert all(guidance == rescaled for _, guidance in applied), applied
    monkeypatch.undo()
    without = results(plain_guidance)
    for consumer, result in with_rescale.items():
        assert (result - without[consumer]).abs().max() > 1e-6, consumer


# --- what a controlled edit holds (issue 31, item 13) ----------------------------------------------------------


def _own_storage(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_a_recorded_layer_keeps_its_items_queries_and_keys_not_the_batchs() -> None:
    """`kept` held views of the whole batch's queries and keys: the source branch's [uncond, cond] call kept both
    items' alive for its conditional one. It keeps the item's alone, with the same numbers."""
    frames = 3
    torch.manual_seed(2)
    hidden, text = torch.randn(2 * frames, 16, 16), torch.randn(2 * frames, 77, 12)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    control = AttentionControl(ControlSchedule(STEPS, 1, 0, frozenset(), ()), [list(range(frames))])
    processor = ControlledAttention(None, control, "cross", "layer")
    with torch.no_grad():
        control.begin("record", record_item=1)
        control.on_call(None, (torch.zeros(2, 4, frames, 4, 4),), {})
        processor(attn, hidden, text)
        q, k = control.recorded[0].kept["layer"]
        assert torch.equal(q, attn.to_q(hidden)[frames:]) and torch.equal(k, attn.to_k(text)[frames:])
    assert _own_storage(q) and _own_storage(k)


@pytest.mark.parametrize("window", [None, 3])
def test_the_trajectory_stays_where_it_is_and_each_step_moves_its_own_latent(
    rig: Rig,
    monkeypatch: pytest.MonkeyPatch,
    window: int | None,
) -> None:
    """The whole trajectory went to the device for each group; it stays on the host, and each step moves the one
    latent it uses (once, whatever the windows) to the prompt's device, with the same numbers."""
    prompts, tokenizer, trajectory = ["a dog is skiing"], rig.tokenizer, rig.trajectory
    blend = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [word_tokens(tokenizer, prompts[0], ["dog"])], 5)
    schedule = _schedule(tokenizer, prompts, blend=blend, fuse_self=True)
    expected, _ = _edit(rig, prompts, schedule, window=window)
    moved: list[torch.Size] = []
    to = torch.Tensor.to

    def spied(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        to_device = "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)
        if to_device and self.untyped_storage().data_ptr() == trajectory.untyped_storage().data_ptr():
            moved.append(self.shape)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spied)
    blend = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [word_tokens(tokenizer, prompts[0], ["dog"])], 5)
    schedule = _schedule(tokenizer, prompts, blend=blend, fuse_self=True)
    out, _ = _edit(rig, prompts, schedule, window=window)
    monkeypatch.undo()
    assert torch.equal(out, expected)
    assert moved == [trajectory.shape[1:]] * (STEPS + 1)  # the noise, then each step's latent
