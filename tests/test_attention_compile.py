"""`--compile` with attention control: the compiled UNet is compiled once for a controlled edit,
not once per step, and computes what the eager one does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch
from diffusers import DDIMScheduler
from transformers import CLIPTokenizer

from tavcli.method.attention_control import AttentionControl, ControlSchedule, controlling
from tavcli.method.controlled_sampling import AttentionSteering, SourceBranch
from tavcli.method.local_blend import LocalBlend
from tavcli.method.prompt_words import token_map, word_tokens
from tavcli.method.sampling import Guidance, ddim_sample
from tavcli.method.windows import call_spans, windowed

from .conftest import TINY_SD

if TYPE_CHECKING:
    from tavcli.method.video_unet import VideoUNet

SOURCE, EDIT = "a man is skiing", "a dog is skiing"
STEPS = 6


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No compiled code shared with other tests, before or after."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _controlled_edit(
    unet: Any,
    scheduler: DDIMScheduler,
    embed: Callable[[str], torch.Tensor],
    window: int | None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """A 6-step controlled edit (Video-P2P's source branch, local blending, fused self-attention) on `unet`."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    blend = LocalBlend(word_tokens(tokenizer, SOURCE, ["man"]), [word_tokens(tokenizer, EDIT, ["dog"])], 5)
    schedule = ControlSchedule(
        STEPS, 2, 3, frozenset({"spatial", "temporal"}), (token_map(tokenizer, SOURCE, EDIT, None),),
        fuse_self=True, blend=blend, blend_replaced=True,
    )  # fmt: skip
    torch.manual_seed(5)
    noise = torch.randn(1, 4, 5, 16, 16)
    call = windowed(unet, window)
    control = AttentionControl(schedule, call_spans(call, 5))
    source = SourceBranch(noise, embed(SOURCE), embed(""))
    steering = AttentionSteering(call, control, source, 1, Guidance(7.5))
    with controlling(unet, control):
        return ddim_sample(
            call, scheduler, noise, embed(EDIT), embed(""), STEPS, Guidance(7.5), on_step=on_step, steering=steering
        )


@pytest.mark.parametrize("window", [None, pytest.param(3, marks=pytest.mark.slow)])  # a minute each
def test_a_compiled_unet_is_compiled_once_for_a_controlled_edit(
    oracle_video_unet: VideoUNet,
    scheduler: DDIMScheduler,
    embed: Callable[[str], torch.Tensor],
    fresh_dynamo: None,
    window: int | None,
) -> None:
    """Dynamo guarded on the control's step counter, read by the processors: each step compiled the whole UNet
    again (9 graphs for 6 steps). The control's own code is left out of the graphs, which then hold no step."""
    eager = _controlled_edit(oracle_video_unet, scheduler, embed, window)
    graphs: list[int] = []

    def counting(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(len(graph.graph.nodes))
        return graph.forward  # run as traced: the numbers are eager ones

    compiled = torch.compile(oracle_video_unet, backend=counting)
    per_step: list[int] = []
    out = _controlled_edit(compiled, scheduler, embed, window, on_step=lambda *_: per_step.append(len(graphs)))
    assert per_step[0] > 0 and per_step == [per_step[0]] * STEPS  # all compiled by the first step, none after
    assert torch.equal(out, eager)
