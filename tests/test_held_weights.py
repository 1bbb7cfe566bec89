"""Sampling holds the UNet's weights in the run's dtype instead of float32 that autocast casts again at every
call: half the memory, the numbers of casting per call, and a session that trains afterwards reloads float32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from tavcli.method.inversion import ddim_inversion
from tavcli.method.sampling import Guidance, ddim_sample
from tavcli.progress import Reporter
from tavcli.runtime import DTYPES, resolve_runtime
from tavcli.settings.tuning import FrameSelection, FrameSize, TuneRequest, TuneSettings
from tavcli.workflow.session import Session, resolve_tune

from .conftest import CLIP, tav_ok

if TYPE_CHECKING:
    from tavcli.method.video_unet import VideoUNet
    from tavcli.models.source import Components
    from tavcli.runtime import Runtime

SMALL = ["-m", "tiny", "--frames", "2", "--width", "32", "--height", "32"]


class _Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture(scope="module", params=["full", "rank"])
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project tuned for 3 steps in float32: every tensor of the delta (full), or rank-2 adapters."""
    root = tmp_path_factory.mktemp("held") / "p.tav"
    rank = ["--rank", "2"] if request.param == "rank" else []
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "--steps", "3", *rank, "-p", root, "-q")
    return root


def _tuned(precision: str, project: Path, reporter: Reporter | None = None) -> tuple[Session, Components, VideoUNet]:
    return _tuned_in(Session(resolve_runtime("cpu", precision), reporter), project)


def _tuned_in(session: Session, project: Path) -> tuple[Session, Components, VideoUNet]:
    """`session`, the model and the UNet of `project`'s current tune, as sampling builds it."""
    components, unet = session.tuned_unet(*resolve_tune(session, project, None))
    return session, components, unet


def _invert_and_sample(runtime: Runtime, components: Components, unet: VideoUNet) -> torch.Tensor:
    """A 4-step inversion of fixed latents, then a guided 4-step sample from its noise, as one tensor."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 2, 4, 4, generator=generator)
    embeds = torch.randn(2, 77, components.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad(), runtime.autocast():
        noise = ddim_inversion(unet, components.scheduler, latents, embeds[1:], 4)[-1]
        edited = ddim_sample(unet, components.scheduler, noise, embeds[:1], embeds[1:], 4, Guidance(12.5))
    return torch.cat([noise.float().flatten(), edited.float().flatten()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sampling_holds_every_weight_in_the_run_dtype_shared_with_the_image_model(
    project: Path, precision: str
) -> None:
    _, components, unet = _tuned(precision, project)
    assert {p.dtype for p in unet.parameters()} == {DTYPES[precision]}  # the tuned and temporal layers too
    assert {p.dtype for p in components.unet.parameters()} == {DTYPES[precision]}
    # The video UNet's frozen weights are the image model's own tensors, not a second copy.
    assert unet.conv_in.weight.data_ptr() == components.unet.conv_in.weight.data_ptr()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    image_block = components.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.to_k.weight.data_ptr() == image_block.attn1.to_k.weight.data_ptr()
    assert block.attn1.to_q.weight.data_ptr() != image_block.attn1.to_q.weight.data_ptr()  # tuned: its own


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_held_weights_give_the_numbers_of_casting_float32_weights_at_every_call(project: Path, precision: str) -> None:
    half = resolve_runtime("cpu", precision)
    session, components, unet = _tuned(precision, project)
    held = _invert_and_sample(half, components, unet)
    _, components32, unet32 = _tuned("fp32", project)
    assert {p.dtype for p in unet32.parameters()} == {torch.float32}
    cast_per_call = _invert_and_sample(half, components32, unet32)  # what sampling did before
    exact = _invert_and_sample(resolve_runtime("cpu", "fp32"), components32, unet32)
    rounding = (cast_per_call - exact).abs().max().item()
    assert rounding > 0.01  # half precision does round here (guidance 12.5 amplifies it), so the bound means something
    # As accurate as casting per call. Not always equal: a low-rank tune merges into weights rounded already.
    assert (held - exact).abs().max().item() <= 1.5 * rounding
    tensors = load_file(next((project / "tunes").glob("*/tensors.safetensors")))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())  # the store keeps float32


def test_a_session_that_sampled_reloads_float32_to_train_and_then_samples_as_a_fresh_session(tmp_path: Path) -> None:
    root = tmp_path / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", *SMALL, "--steps", "1", "--rank", "2", "-p", root, "-q")
    from tavcli.workflow import tuning

    notes = _Notes()
    session, components, _ = _tuned("bf16", root, notes)
    assert components.unet.dtype == torch.bfloat16
    request = TuneRequest(
        clip=CLIP, prompt="a man is skiing", project=root, model="tiny", selection=FrameSelection(frames=2),
        size=FrameSize(width=32, height=32), settings=TuneSettings(steps=2, rank=2),
    )  # fmt: skip
    after_sampling = tuning.tune(session, request)[-1]
    assert notes.notes.count("reloading model tiny in float32 to train") == 1
    trained = {name: t.clone() for name, t in load_file(after_sampling.path / "tensors.safetensors").items()}
    fresh = Session(resolve_runtime("cpu", "bf16"))
    again = tuning.tune(fresh, request, force=True)[-1]
    assert again.key == after_sampling.key
    retrained = load_file(again.path / "tensors.safetensors")
    assert trained.keys() == retrained.keys() and all(torch.equal(trained[n], retrained[n]) for n in trained)

    # Having trained, the session samples from a copy in bf16 and keeps float32 weights for the next tune: the
    # numbers are a fresh session's (a preview's edit is what `tav edit` makes), and nothing is loaded again.
    _, components, unet = _tuned_in(session, root)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16} and components.unet.dtype == torch.float32
    _, fresh_components, fresh_unet = _tuned("bf16", root)
    runtime = session.runtime
    held = _invert_and_sample(runtime, components, unet)
    assert torch.equal(held, _invert_and_sample(runtime, fresh_components, fresh_unet))
    tuning.tune(session, replace(request, settings=TuneSettings(steps=3, rank=2)))
    assert notes.notes.count("reloading model tiny in float32 to train") == 1
    assert not session._tuned  # training released the tuned UNet (and its bf16 copy of the base)
