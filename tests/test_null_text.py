"""`--inversion null-text` and `--inversion negative-prompt`: inversions whose edits give the source clip back
with the source prompt, cached, resumable, recorded and reproduced like every other entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tavcli.errors import TavError

from .conftest import CLIP, RunTav, one_job, reproduce_in, tav_ok

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "10"]
SOURCE = "a man is skiing"
# The paper's budget (10 iterations at 1e-2) barely moves the tiny random model, whose UNet hardly
# depends on the text embedding; this one fits it (docs/method.md, "Reconstruction").
FIT = ["--null-iterations", "20", "--null-lr", "0.1"]
EDIT = ["--steps", "5", "--guidance", "7.5"]


def _edit_latents(project: Path, key: str) -> torch.Tensor:
    from tavcli.store.project import Project

    return Project(project).find("edits", key).tensors()["latents"]


def _clean_latents(project: Path) -> torch.Tensor:
    """The tuned clip's posterior mean, scaled as the UNet sees it (what a perfect reconstruction gives)."""
    from tavcli.models.resolving import resolve_model
    from tavcli.store.project import Project

    store = Project(project)
    latents = store.find("latents", store.find("tunes", store.current_tune()).spec["latents"])
    scaling = json.loads((resolve_model("tiny").folder / "vae" / "config.json").read_text())["scaling_factor"]
    return latents.tensors()["mean"] * scaling


def _edit(run_tav: RunTav, project: Path, *args: str | Path) -> dict[str, Any]:
    code, out, err = run_tav("edit", SOURCE, "-p", project, *EDIT, *args)
    assert code == 0, err
    record: dict[str, Any] = json.loads(out.splitlines()[-1])
    return record


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("null-text") / "p.tav"
    tav_ok("tune", CLIP, SOURCE, *SMALL, "-p", project)
    return project


def test_bad_inversion_values_get_one_line_before_any_model_loads(
    tuned: Path, tiny_lora: Path, run_tav: RunTav
) -> None:
    cases: list[tuple[list[str], str]] = [
        (["--inversion", "foo"], "--inversion"),
        (["--null-iterations", "0"], "--null-iterations"),
        (["--null-lr", "nan"], "--null-lr"),
        (["--inversion", "null-text", "--negative", "blurry"], "--negative cannot go with --inversion null-text"),
        (["--inversion", "negative-prompt", "--negative", "blurry"], "the unconditional branch is the inversion's"),
        (["--inversion", "null-text", "--eta", "0.5"], "--eta must be 0"),
        (["--inversion", "null-text", "--lora", str(tiny_lora)], "fitted without edit-time LoRAs"),
        (["--null-iterations", "5"], "--null-iterations applies to --inversion null-text"),
    ]
    for args, said in cases:
        code, out, err = run_tav("edit", "a dog", "-p", tuned, *args)
        assert code == 2 and out == "" and said in err and "Traceback" not in err, (args, err)
    code, _, err = run_tav("invert", "-p", tuned, "--guidance", "5")
    assert code == 2 and "--inversion null-text" in err
    code, _, err = run_tav("invert", "-p", tuned, "--inversion", "null-text", "--prompt", "a dog")
    assert code == 2 and "inverts with the tune's prompt" in err


@pytest.mark.slow
def test_every_inversion_edits_other_frames_in_windows(tuned: Path, run_tav: RunTav) -> None:
    for inversion in (["--inversion", "negative-prompt"], ["--inversion", "null-text", "--null-iterations", "2"]):
        record = _edit(run_tav, tuned, *inversion, "--frames", "4", "--window", "3")
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert sidecar["frames"]["edited"]["frames"] == 4 and sidecar["inversion"]["window"] == 3, sidecar
        assert sidecar["inversion"]["prompt"] == SOURCE


@pytest.mark.slow
def test_null_text_reconstructs_the_clip_and_its_fit_is_reused(
    tuned: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = _clean_latents(tuned)
    plain = _edit(run_tav, tuned)
    source_prompt = _edit(run_tav, tuned, "--inversion", "negative-prompt")
    fitted = _edit(run_tav, tuned, "--inversion", "null-text", *FIT)
    error = {
        name: torch.nn.functional.mse_loss(_edit_latents(tuned, record["key"]), clean).item()
        for name, record in (("ddim", plain), ("negative-prompt", source_prompt), ("null-text", fitted))
    }
    # Measured 2026-12-01 (CPU): ddim 1.92, negative-prompt 0.37, null-text 0.050 (0.76 with the paper's budget).
    assert error["null-text"] < 0.1 * error["ddim"] and error["null-text"] < 0.5 * error["negative-prompt"], error
    sidecar = json.loads(Path(fitted["sidecar"]).read_text())
    assert sidecar["inversion_settings"]["inversion"] == "null-text" and sidecar["null_text"]["guidance"] == 7.5
    assert sidecar["inversion"]["prompt"] == SOURCE
    meta = json.loads((tuned / "nulltexts" / sidecar["null_text"]["key"] / "meta.json").read_text())
    assert len(meta["losses"]) == 5 and (tuned / "nulltexts" / sidecar["null_text"]["key"] / "loss.png").is_file()

    def refit(*args: object, **kwargs: object) -> None:
        raise TavError("the embeddings were fitted again")

    monkeypatch.setattr("tavcli.workflow.null_text.optimise_null_text", refit)
    other = json.loads(run_tav("edit", "a panda is skiing", "-p", tuned, *EDIT, "--inversion", "null-text", *FIT)[1])
    assert other["cached"] is False  # a new edit, from the embeddings already fitted
    code, _, err = run_tav("edit", "a panda is skiing", "-p", tuned, "--steps", "5", "--inversion", "null-text", *FIT)
    assert code == 1 and "fitted again" in err  # another guidance needs its own fit
    monkeypatch.undo()
    code, out, err = run_tav("ls", "-p", tuned, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert sidecar["null_text"]["key"] in {row["key"] for row in rows if row["kind"] == "nulltexts"}
    assert all("latents" in row["spec"] for row in rows if row["kind"] == "checkpoints")  # a finished fit keeps none
    assert run_tav("verify", "-p", tuned)[0] == 0


@pytest.mark.slow
def test_negative_prompt_inversion_is_the_source_prompt_as_negative(tuned: Path, run_tav: RunTav) -> None:
    """Miyake et al.'s method is exactly: invert with the source prompt, sample it as the negative prompt."""
    from tavcli.store.project import Project

    record = _edit(run_tav, tuned, "--inversion", "negative-prompt")
    current = Project(tuned).state.get("inversion")
    assert run_tav("invert", "-p", tuned, "--steps", "5", "--inversion", "negative-prompt")[0] == 0
    assert Project(tuned).state.get("inversion") == current  # a plain `tav edit` stays the reference's
    assert run_tav("invert", "-p", tuned, "--steps", "5", "--prompt", SOURCE)[0] == 0
    by_hand = _edit(run_tav, tuned, "--negative", SOURCE)
    assert torch.equal(_edit_latents(tuned, record["key"]), _edit_latents(tuned, by_hand["key"]))
    assert run_tav("invert", "-p", tuned, "--steps", "5")[0] == 0  # back to the reference's inversion


@pytest.mark.slow
def test_an_interrupted_fit_resumes_to_the_same_embeddings(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tavcli.store.checkpoints import Checkpoints

    project, uninterrupted = tmp_path / "resumed.tav", tmp_path / "uninterrupted.tav"
    for folder in (project, uninterrupted):
        tav_ok("tune", CLIP, SOURCE, *SMALL, "-p", folder)
    save, saved = Checkpoints.save, []

    def save_then_stop(self: Checkpoints, step: int, *args: Any) -> Path:
        path = save(self, step, *args)
        saved.append(step)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Checkpoints, "save", save_then_stop)
    fit = ["invert", "--steps", "5", "--inversion", "null-text", "--guidance", "7.5", *FIT]
    assert run_tav(*fit, "-p", project)[0] == 130
    monkeypatch.undo()
    _resumes_at_step_2_to_the_uninterrupted_fit(run_tav, fit, project, uninterrupted)


@pytest.mark.slow
def test_a_fit_that_stops_being_finite_keeps_its_last_good_step_and_resumes_from_it(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last Adam step of step 3 makes the embedding NaN (its loss was finite): the fit stops there in one
    line, step 2's state stays on disk, and a rerun resumes from it to the embeddings of an unbroken fit."""
    import shutil

    from tavcli.store.checkpoints import Checkpoints

    project, uninterrupted = tmp_path / "broken.tav", tmp_path / "unbroken.tav"
    assert run_tav("tune", CLIP, SOURCE, *SMALL, "-p", project)[0] == 0
    shutil.copytree(project, uninterrupted)
    step, calls = torch.optim.Adam.step, []

    def poisoned(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # one iteration per step: step 3's last
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    fit = ["invert", "--steps", "5", "--inversion", "null-text", "--guidance", "7.5", "--null-iterations", "1"]
    code, out, err = run_tav(*fit, "-p", project)
    assert code == 1 and out == "" and "Traceback" not in err and len(calls) == 3, err
    runs = [Checkpoints(folder) for folder in (project / "checkpoints").iterdir()]
    (fit_states,) = [states for states in runs if "inversion" in states.run()]  # not the tune's
    assert fit_states.steps() == [2]
    tensors, _ = fit_states.read(2)  # refuses NaN or inf
    assert len(tensors["embeddings"]) == 2
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and "not finite after step 3" in last and "--null-lr" in last, err
    monkeypatch.undo()
    _resumes_at_step_2_to_the_uninterrupted_fit(run_tav, fit, project, uninterrupted)


@pytest.mark.slow
def test_a_null_text_edit_is_reproduced_in_a_fresh_project_and_from_a_batch(
    tuned: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    record = _edit(run_tav, tuned, "--inversion", "null-text", *FIT)
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    again = reproduce_in(run_tav, sidecar, tmp_path / "fresh.tav")[-1]
    assert again["key"] == record["key"] and Path(again["path"]).read_bytes() == Path(record["path"]).read_bytes()
    rendered = json.loads(run_tav("edit", "--from-sidecar", record["sidecar"])[1])
    assert rendered["key"] == record["key"] and rendered["cached"] is True
    invert = "{ inversion = 'null-text', null_iterations = 20, null_lr = 0.1 }"
    jobs = one_job(tmp_path, tuned, [SOURCE], invert=invert, edit="{ steps = 5, guidance = 7.5 }")
    code, out, err = run_tav("batch", jobs)
    assert code == 0, err
    assert [r["key"] for r in map(json.loads, out.splitlines()) if r.get("kind") == "edit"] == [record["key"]]
    planned = [json.loads(line) for line in run_tav("batch", jobs, "--dry-run")[1].splitlines()]
    assert {row["action"] for row in planned} == {"reuse"} and "null-text" in {row["kind"] for row in planned}
    fitted = tuned / "nulltexts" / sidecar["null_text"]["key"]
    assert run_tav("rm", f"inversions/{sidecar['inversion']['key']}", "-p", tuned, "--yes")[0] == 0
    assert not fitted.exists() and not Path(record["path"]).exists()  # the fit and the edit went with it


@pytest.mark.slow
def test_the_fit_runs_on_frozen_weights_and_gives_their_flags_back(
    tuned: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the embedding is differentiated: weights that require a gradient would make autograd keep every
    layer's input for theirs. The session's tuned UNet is left as it was."""
    from tavcli.method.null_text import optimise_null_text
    from tavcli.method.windows import WindowedUNet

    flags = []

    def spied(unet: Any, *args: Any, **kwargs: Any) -> Any:
        module = unet.unet if isinstance(unet, WindowedUNet) else unet
        flags.append((module, {param.requires_grad for param in module.parameters()}))
        return optimise_null_text(unet, *args, **kwargs)

    monkeypatch.setattr("tavcli.workflow.null_text.optimise_null_text", spied)
    args: list[str | Path] = ["--inversion", "null-text", "--null-iterations", "1", "--guidance", "6", "-p", tuned]
    assert run_tav("invert", "--steps", "3", *args)[0] == 0
    ((module, during),) = flags
    assert during == {False}
    assert {param.requires_grad for param in module.parameters()} == {True}  # as `inflate_unet` made them


def _resumes_at_step_2_to_the_uninterrupted_fit(
    run_tav: RunTav, fit: list[str], project: Path, uninterrupted: Path
) -> None:
    """The same command goes on from step 2 and stores the very bytes an uninterrupted fit stores."""
    code, out, err = run_tav(*fit, "-p", project)
    assert code == 0 and "resumed at step 2 of 5" in err, err
    resumed = json.loads(out.splitlines()[-1])
    first = json.loads(run_tav(*fit, "-p", uninterrupted)[1].splitlines()[-1])
    assert resumed["key"] == first["key"]
    files = [Path(record["path"]) / "tensors.safetensors" for record in (resumed, first)]
    assert files[0].read_bytes() == files[1].read_bytes()
