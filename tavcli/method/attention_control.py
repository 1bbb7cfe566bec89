"""Attention control: attention processors that let an edit take the source clip's attention (Prompt-to-Prompt
for video, as Video-P2P; FateZero's fusion), installed on the video UNet for one edit and removed after it
(docs/method.md, "Attention control").

A controlled step makes two kinds of UNet call. The *source* call (`record`) runs the source clip's latent:
each controlled layer keeps the source item's queries and keys, and the blend layers add its attention to the
source words to the local blend. The *edit* call (`replay`) then changes the attention of the edit's
conditional items in those layers. Probabilities P = softmax(q k^T / sqrt(d)) are never formed where they need
not be: attention is linear in the values, so

    P_src V                                   = SDPA(q_src, k_src, V)
    sum_j w_j (a_j P_src[:, s_j] + (1 - a_j) P[:, j]) v_j
                                              = SDPA(q_src, k_src, S^T (a w v)) + SDPA(q, k, (1 - a) w v)

(S the token map's one-hot matrix, `prompt_words.TokenMap`), and blending rows by a mask m per query,
m P + (1 - m) P_src, blends the outputs alike. So fused kernels (SDPA) run throughout; only the blend layers
form the probabilities of their words' tokens.

Which layers: cross-attention (`attn2`) everywhere; sparse-causal self-attention (`attn1`) in layers of at most
a quarter of the latent's tokens (FateZero's 32x32 at 512x512); temporal attention (`attn_temp`) everywhere
(Video-P2P's "self" maps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from tavcli.errors import TavError
from tavcli.method.local_blend import LocalBlend, replaced_word_maps, word_maps
from tavcli.method.prompt_words import TokenMap
from tavcli.method.video_unet import sparse_causal_attention, split_heads

__all__ = ["AttentionControl", "ControlSchedule", "SelfKind", "controlling", "layer_grid"]

_Function = TypeVar("_Function", bound=Callable[..., Any])

SelfKind = Literal["spatial", "temporal"]
Kind = Literal["cross", "spatial", "temporal"]
Mode = Literal["off", "record", "replay"]


def _eager(function: _Function) -> _Function:
    """`function` run as it is under `--compile` (`torch.compile`), between the compiled pieces of the UNet.

    Traced, what the control reads (its step, its mode, its call's number) would be guarded on, and the whole UNet
    compiled again at each step; left out, the UNet is compiled once, in pieces around its attention layers.
    """
    return cast(_Function, torch.compiler.disable(function))


@dataclass(frozen=True)
class ControlSchedule:
    """What a controlled edit changes, and in which of its steps (0-based)."""

    steps: int
    cross_steps: int  # cross-attention taken from the source in steps [0, cross_steps)
    self_steps: int  # self-attention taken from the source in steps [0, self_steps)
    self_kinds: frozenset[SelfKind]
    token_maps: tuple[TokenMap, ...]  # one per prompt of the edit's batch
    fuse_self: bool = False  # FateZero: self-attention blended by the source words' region instead of replaced
    blend: LocalBlend | None = None
    # Local blending reads the edit words' maps as replaced while cross-attention is (Video-P2P), or their own.
    blend_replaced: bool = False

    def maps_needed(self, step: int) -> bool:
        """Whether step `step` needs the source's attention (its layers' queries and keys, or its blend maps)."""
        source_words = self.blend is not None and bool(self.blend.source_tokens)
        return source_words or step < max(self.cross_steps, self.self_steps)


@dataclass
class _Call:
    """One UNet call of a step: its clips, frames and size, and (recording) what its layers kept."""

    items: int
    frames: torch.Tensor  # the clip's frame numbers this call holds (a window's, or all)
    size: tuple[int, int]  # the latent's height and width
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by layer: q, k


class AttentionControl:
    """The state the controlled processors of one UNet share during one edit: the step, the mode, the calls.

    `spans[k]` are the frames of the k-th UNet call of a step (the windows of `tavcli.method.windows`, or all
    frames): each edit call replays the source call of the same number.
    """

    def __init__(self, schedule: ControlSchedule, spans: list[list[int]]) -> None:
        self.schedule = schedule
        self.spans = spans
        self.step = 0
        self.mode: Mode = "off"
        self.record_item = 0  # the batch item a source call records (its conditional half)
        self.edit_items: tuple[int, ...] = ()  # the batch items an edit call controls, one per prompt
        self.recorded: dict[int, _Call] = {}  # the source's calls of this step, by number
        self.calls: list[_Call] = []  # the calls of the current mode
        # Called with the number of each edit call before it runs: records the source's call of that number
        # just in time, so that under windows only one window's queries and keys are held.
        self.before_replay: Callable[[int], None] | None = None
        self._first = 0  # the number of the first call of the current mode
        self._spans: dict[torch.device, list[torch.Tensor]] = {}  # on the device once: no copy per call

    def begin(self, mode: Mode, *, record_item: int = 0, edit_items: tuple[int, ...] = ()) -> None:
        """Start the source call (`record` item `record_item`), the edit call (`replay` onto `edit_items`), or stop."""
        self.mode, self.record_item, self.edit_items = mode, record_item, edit_items
        self.calls, self._first = [], 0
        if mode == "record":
            self.recorded = {}

    def record_call(self, number: int, run: Callable[[], Any], record_item: int = 0) -> None:
        """Record the source's call number `number` alone, made by `run()`, in the middle of the current mode."""
        saved = self.mode, self.calls, self._first, self.record_item
        self.mode, self.calls, self._first, self.record_item = "record", [], number, record_item
        try:
            run()
        finally:
            self.mode, self.calls, self._first, self.record_item = saved

    def span(self, number: int, device: torch.device) -> torch.Tensor:
        """The frames of call `number`, as an index on `device`."""
        if device not in self._spans:
            self._spans[device] = [torch.tensor(span, device=device) for span in self.spans]
        return self._spans[device][number]

    @_eager  # read by no graph: the mode and the call's number change every call
    def on_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The UNet's forward pre-hook: a new call of (clips, c, f, h, w) latents."""
        if self.mode == "off":
            return
        sample = args[0] if args else kwargs["sample"]
        number = self._first + len(self.calls)
        if number >= len(self.spans):
            raise TavError(f"attention control expected {len(self.spans)} UNet calls per step, got more")
        if self.mode == "replay" and self.before_replay is not None:
            self.before_replay(number)
        call = _Call(sample.shape[0], self.span(number, sample.device), (sample.shape[-2], sample.shape[-1]))
        self.calls.append(call)
        if self.mode == "record":
            self.recorded[number] = call

    def source(self) -> _Call:
        """The source's call that the current edit call replays (of the same number)."""
        number = self._first + len(self.calls) - 1
        if number not in self.recorded:
            raise TavError(f"attention control has no source call {number} to replay at step {self.step}")
        return self.recorded[number]

    def active(self, kind: Kind, queries: int) -> tuple[bool, bool]:
        """Whether a layer of `kind` with `queries` queries per frame takes the source's attention now, and
        whether it gives blend maps."""
        if self.mode == "off" or not self.calls:
            return False, False
        schedule, call = self.schedule, self.calls[-1]
        tokens = call.size[0] * call.size[1]
        if kind == "cross":
            blend_layer = schedule.blend is not None and layer_grid(call.size, queries) == _blend_grid(call.size)
            return self.step < schedule.cross_steps, blend_layer
        if kind == "spatial" and queries * 4 > tokens:
            return False, False
        return self.step < schedule.self_steps and kind in schedule.self_kinds, False


def _halved(size: tuple[int, int]) -> tuple[int, int]:
    return (size[0] + 1) // 2, (size[1] + 1) // 2  # SD's downsampling: stride-2 convolution, padding 1


def _blend_grid(size: tuple[int, int]) -> tuple[int, int]:
    return _halved(_halved(size))


def layer_grid(size: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `queries` tokens per frame in a UNet on latents of `size`."""
    grid = size
    while grid[0] * grid[1] > queries:
        grid = _halved(grid)
    if grid[0] * grid[1] != queries:
        raise TavError(
            f"attention control found a layer of {queries} tokens in a UNet on {size[0]}x{size[1]} latents",
            "attention control knows SD 1.x and 2.x UNets, whose layers halve the latent's size",
        )
    return grid


class ControlledAttention:
    """An attention processor that computes what `inner` does, and in controlled layers and steps, the
    recording or the replaying of the source's attention."""

    def __init__(self, inner: Any, control: AttentionControl, kind: Kind, name: str) -> None:
        self.inner, self.control, self.kind, self.name = inner, control, kind, name

    @_eager  # read by no graph: the step and the mode it reads change every call
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        control = self.control
        replace, blend_maps = control.active(self.kind, self._queries(hidden_states))
        if not (replace or blend_maps) or attention_mask is not None:
            result: torch.Tensor = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            return result
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        call = control.calls[-1]
        rows = hidden_states.shape[0] // call.items
        # The edit items' own attention is only needed where fusion blends it in.
        unused = control.mode == "replay" and replace and (self.kind == "cross" or not control.schedule.fuse_self)
        out = self._own(attn, q, k, v, rows, set(control.edit_items) if unused else set())
        blend = control.schedule.blend
        if control.mode == "record":
            item = slice(control.record_item * rows, (control.record_item + 1) * rows)
            if replace:
                call.kept[self.name] = _alone(q, item), _alone(k, item)
            if blend_maps and blend is not None and blend.source_tokens:
                grid = layer_grid(call.size, q.shape[1])
                blend.add_source(call.frames, word_maps(attn, q[item], k[item], blend.source_tokens, grid))
        else:
            source = control.source() if replace else None
            for prompt, index in enumerate(control.edit_items):
                item = slice(index * rows, (index + 1) * rows)
                kept = None if source is None else source.kept[self.name]
                if blend_maps and blend is not None and blend.edit_tokens[prompt]:
                    tokens, grid = blend.edit_tokens[prompt], layer_grid(call.size, q.shape[1])
                    if kept is not None and control.schedule.blend_replaced:
                        token_map = control.schedule.token_maps[prompt]
                        maps = replaced_word_maps(attn, q[item], k[item], *kept, tokens, token_map, grid)
                    else:
                        maps = word_maps(attn, q[item], k[item], tokens, grid)
                    blend.add_edit(prompt, call.frames, maps)
                if kept is not None:
                    out[item] = self._controlled(attn, q[item], k[item], v[item], out[item], *kept, prompt)
        projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
        # Ends as the layer's own processor does (diffusers' divides by 1: a new tensor, not a view of `to_out`'s),
        # so the graph `--compile` resumes after the layer is given the same kind of tensor whichever path ran.
        if self.kind != "spatial":
            projected = projected / attn.rescale_output_factor
        return projected

    def _own(
        self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int, skipped: set[int]
    ) -> torch.Tensor:
        """The layer's own attention of every batch item but the `skipped` ones (left zero: replaced after)."""
        if not skipped:
            return self._attend(attn, q, k, v)
        out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
        kept = [item for item in range(q.shape[0] // rows) if item not in skipped]
        for _, run in groupby(enumerate(kept), key=lambda pair: pair[1] - pair[0]):  # consecutive items at once
            items = [item for _, item in run]
            part = slice(items[0] * rows, (items[-1] + 1) * rows)
            out[part] = self._attend(attn, q[part], k[part], v[part])
        return out

    def _queries(self, hidden_states: torch.Tensor) -> int:
        """Queries per frame: the tokens of a spatial layer, or for temporal attention its spatial positions."""
        if self.kind != "temporal" or not self.control.calls:
            return int(hidden_states.shape[1])
        return int(hidden_states.shape[0]) // self.control.calls[-1].items

    def _attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What the layer's own processor computes before `to_out`: sparse-causal or plain attention."""
        if self.kind == "spatial":
            return sparse_causal_attention(attn, q, k, v, len(self.control.calls[-1].frames))
        heads = attn.heads
        out = F.scaled_dot_product_attention(
            split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), scale=attn.scale
        )
        return out.transpose(1, 2).flatten(2).to(q.dtype)

    def _controlled(
        self,
        attn: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        own: torch.Tensor,
        q_src: torch.Tensor,
        k_src: torch.Tensor,
        prompt: int,
    ) -> torch.Tensor:
        """One conditional edit item's attention output, taken from the source's (the module's equations)."""
        if self.kind == "cross":
            token_map = self.control.schedule.token_maps[prompt]  # on the device already (`TokenMap.to`)
            mapped = torch.zeros_like(v).index_add_(1, token_map.source, v * token_map.taken.to(v.dtype)[:, None])
            out = self._attend(attn, q_src, k_src, mapped)
            if token_map.mode == "refine":  # new tokens keep their own maps
                out = out + self._attend(attn, q, k, v * token_map.own.to(v.dtype)[:, None])
            return out
        replaced = self._attend(attn, q_src, k_src, v)
        if not self.control.schedule.fuse_self:
            return replaced
        keep = self._fusion_mask(own)
        return keep * own + (1 - keep) * replaced

    def _fusion_mask(self, own: torch.Tensor) -> torch.Tensor:
        """FateZero's self-attention fusion weight per query row, shaped to broadcast over `own` (rows, n, c):
        1 inside the source words' region (the edit's own attention), 0 outside (the source's)."""
        control = self.control
        call = control.calls[-1]
        blend = control.schedule.blend
        region = None if blend is None else blend.source_region(call.size)
        if region is None:
            return torch.zeros_like(own[..., :1])
        region = region[call.frames]  # (f, h, w) at the latent's size
        if self.kind == "spatial":
            grid = layer_grid(call.size, own.shape[1])
            pooled = F.adaptive_max_pool2d(region[:, None], grid)  # a layer cell is inside if any latent pixel is
            return pooled.flatten(1)[..., None].to(own.dtype)  # (f, n, 1)
        grid = layer_grid(call.size, own.shape[0])  # temporal: rows are positions, tokens are frames
        pooled = F.adaptive_max_pool2d(region[:, None], grid)
        return pooled.flatten(1).T[..., None].to(own.dtype)  # (positions, f, 1)


def _alone(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """`tensor[rows]`, copied where the batch holds other items: kept as a view, it would keep all of them alive."""
    part = tensor[rows]
    return part if len(part) == len(tensor) else part.clone()


def _kind(name: str) -> Kind:
    if ".attn_temp." in name:
        return "temporal"
    return "cross" if ".attn2." in name else "spatial"


@contextmanager
def controlling(unet: Any, control: AttentionControl) -> Iterator[None]:
    """The video UNet with controlled processors around its own (and a pre-hook counting its calls) for the
    block, then as it was: nothing of the control outlives the edit."""
    model = getattr(unet, "_orig_mod", unet)  # a compiled UNet's module
    before = model.attn_processors
    model.set_attn_processor(
        {name: ControlledAttention(processor, control, _kind(name), name) for name, processor in before.items()}
    )
    hook = model.register_forward_pre_hook(control.on_call, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        model.set_attn_processor(before)
