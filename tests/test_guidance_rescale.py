"""`--guidance-rescale` (diffusers' `guidance_rescale`), and the one path every sampling option takes: a field
of `EditSettings` is a flag of `tav edit`, a field of batch jobs' `edit` table, part of the edit's key (left
out at its default where declared so), read back from sidecars and written into their reproduce commands."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

from .conftest import CLIP, RunTav, one_job, tav_commands

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "10"]


def test_every_sampling_setting_is_a_declared_flag_of_tav_edit() -> None:
    from tavcli.settings.options import EDIT
    from tavcli.settings.sampling import EditSettings

    flags = {flag for param in tav_commands()["edit"].params for flag in param.opts}
    for setting in fields(EditSettings):
        option = EDIT[setting.name]
        assert setting.default == option.default and option.flag in flags, setting.name
    assert EditSettings.named({"guidance_rescale": 0.5, "format": "gif"}) == EditSettings(guidance_rescale=0.5)


def test_the_rescale_is_in_the_edit_key_only_when_it_is_used(tmp_path: Path) -> None:
    from tavcli.runtime import Runtime
    from tavcli.settings.sampling import EditSettings
    from tavcli.workflow.keys import edit_spec

    cpu = Runtime(torch.device("cpu"), "fp32")
    # What the spec of a default edit was before the option existed: its key stays the same.
    before = {"inversion": "1" * 16, "prompt": "a dog", "steps": 50, "guidance": 12.5, "negative": ""}
    assert edit_spec("1" * 16, "a dog", EditSettings(), cpu) == {
        **before,
        "seed": None,
        "eta": 0.0,
        "precision": "fp32",
    }
    rescaled = edit_spec("1" * 16, "a dog", EditSettings(guidance_rescale=0.7), cpu)
    assert rescaled["guidance_rescale"] == 0.7


def test_the_null_text_key_and_the_fit_flags_are_made_from_the_guidance_settings_as_before(tmp_path: Path) -> None:
    """`null_text_entry` and the reproduced `tav invert`'s flags take every guidance setting by name
    (`GUIDANCE`); their specs, key order included, and flags are those written before they did."""
    from tavcli.runtime import Runtime
    from tavcli.settings.options import GUIDANCE
    from tavcli.settings.sampling import EditSettings, InversionSettings
    from tavcli.store.project import Project
    from tavcli.workflow.keys import NULL_TEXT_FORMULA, null_text_entry
    from tavcli.workflow.records import _fit_flags

    assert GUIDANCE == ("guidance", "guidance_rescale")
    cpu, project, inversion = Runtime(torch.device("cpu"), "fp32"), Project(tmp_path), InversionSettings()

    def spec(settings: EditSettings) -> list[tuple[str, Any]]:
        return list(null_text_entry(project, "1" * 16, settings, inversion, cpu).spec.items())

    before = [
        ("inversion", "1" * 16),
        ("guidance", 12.5),
        ("iterations", inversion.null_iterations),
        ("learning_rate", inversion.null_lr),
        ("formula", NULL_TEXT_FORMULA),
    ]
    assert spec(EditSettings()) == spec(EditSettings(guidance_rescale=-0.0)) == before
    assert spec(EditSettings(guidance=5, guidance_rescale=0.7)) == [
        *[(name, 5 if name == "guidance" else value) for name, value in before],
        ("guidance_rescale", 0.7),
    ]
    assert _fit_flags({"guidance": 12.5, "steps": 50}) == ["--guidance", 12.5]
    assert _fit_flags({"guidance": 0.0, "guidance_rescale": 0.7}) == ["--guidance", 0.0, "--guidance-rescale", 0.7]


class _Unet:
    """A UNet whose unconditional prediction is 0 and whose conditional one depends on the latents."""

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> SimpleNamespace:
        uncond, cond = sample.chunk(2)
        return SimpleNamespace(sample=torch.cat([torch.zeros_like(uncond), 0.3 * cond + 0.1 * torch.sin(3 * cond)]))


def _sample(guidance: float, rescale: float) -> torch.Tensor:
    from tavcli.method.sampling import Guidance, ddim_sample

    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(2, 5, 8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return ddim_sample(_Unet(), scheduler, latents, text, text, 5, Guidance(guidance, guidance_rescale=rescale))


def test_full_rescale_gives_the_prediction_back_its_conditional_spread() -> None:
    """With a zero unconditional prediction the guided one is `g * cond`; rescaled fully to the spread of
    `cond` it is `cond` again: guidance 7.5 fully rescaled samples what guidance 1 samples."""
    assert torch.allclose(_sample(7.5, 1.0), _sample(1.0, 0.0), atol=1e-5)
    assert not torch.allclose(_sample(7.5, 0.5), _sample(7.5, 0.0), atol=1e-3)
    assert torch.allclose(_sample(1.0, 0.7), _sample(1.0, 0.0), atol=1e-6)  # unguided: nothing to rescale


@pytest.mark.slow
def test_a_rescaled_edit_is_reproduced_by_its_sidecar_and_by_a_batch_job(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "r.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "2", "--guidance-rescale", "0.7")
    assert code == 0, err
    edit: dict[str, Any] = json.loads(out)
    sidecar = json.loads(Path(edit["sidecar"]).read_text())
    assert sidecar["edit"]["guidance_rescale"] == 0.7 and "--guidance-rescale 0.7" in sidecar["reproduce"][2]
    plain = json.loads(run_tav("edit", "a dog", "-p", project, "--steps", "2")[1])
    assert plain["key"] != edit["key"]
    again = json.loads(run_tav("edit", "--from-sidecar", edit["sidecar"])[1])
    assert again["key"] == edit["key"] and again["cached"] is True
    jobs = one_job(tmp_path, project, ["a dog"], edit="{ steps = 2, guidance_rescale = 0.7 }")
    code, out, err = run_tav("batch", jobs)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["key"] for r in records if r.get("kind") == "edit"] == [edit["key"]]


@pytest.mark.slow
def test_the_edit_settings_guidance_is_what_every_sampler_of_an_edit_applies(
    tmp_path: Path, run_tav: RunTav, guidance_calls: list[tuple[str, Any]]
) -> None:
    """`tav edit --guidance 5 --guidance-rescale 0.3` with a null-text fit and a source branch: the fit, the branch
    and the edit's sampling each apply that one guidance (a consumer the workflow left out would apply another)."""
    from tavcli.method.sampling import Guidance

    project = tmp_path / "g.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    applied = guidance_calls
    applied.clear()  # the edit's alone
    guidance = ["--guidance", "5", "--guidance-rescale", "0.3"]
    control = [
        "--inversion",
        "null-text",
        "--null-iterations",
        "1",
        "--cross-replace",
        "0.5",
        "--attention-from",
        "branch",
    ]
    code, _, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "2", *guidance, *control)
    assert code == 0, err
    assert {consumer for consumer, _ in applied} == {"edit", "branch", "null-text"}
    assert {guidance for _, guidance in applied} == {Guidance(5.0, guidance_rescale=0.3)}
