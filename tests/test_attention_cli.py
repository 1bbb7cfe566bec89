"""Attention control from the command line and batch files: one-line refusals, keys, sidecars, reproduce,
`--from-sidecar`, batch jobs and the grid of plain and controlled edits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLIP, RunTav, one_job, reproduce_in, tav_in_fresh_python, tav_ok

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "10"]  # as one_job
SOURCE = "a man is skiing"
CONTROL = ["--cross-replace", "0.4", "--self-replace", "0.6", "--self-attention", "both", "--blend-source", "man"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("attention") / "p.tav"
    tav_ok("tune", CLIP, SOURCE, *SMALL, "-p", project)
    return project


def _edit(run_tav: RunTav, project: Path, prompt: str, *args: str | Path) -> dict[str, Any]:
    code, out, err = run_tav("edit", prompt, "-p", project, "--steps", "5", *args)
    assert code == 0, err
    record: dict[str, Any] = json.loads(out.splitlines()[-1])
    return record


def test_bad_attention_options_get_one_line(tuned: Path, run_tav: RunTav) -> None:
    cases: list[tuple[list[str], str]] = [
        (["--cross-replace", "1.5"], "--cross-replace"),
        (["--self-attention", "all"], "--self-attention"),
        (["--cross-replace", "0.5", "--reweight", "dog"], "WORD=SCALE"),
        (["--cross-replace", "0.5", "--reweight", "dog=nan"], "WORD=SCALE"),
        (["--reweight", "dog=2"], "--reweight applies to --cross-replace"),
        (["--self-attention", "both"], "--self-attention applies to --self-replace"),
        (["--attention-from", "branch"], "applies to attention control"),
        (["--cross-replace", "0.5", "--attention-from", "branch"], "give --inversion null-text"),
        (
            ["--cross-replace", "0.5", "--attention-from", "branch", "--inversion", "negative-prompt", "--eta", "0.5"],
            "--eta must be 0",
        ),
        (["--blend-edit", "cat"], "'cat' is not a word of 'a dog is skiing' (its words are: a, dog, is, skiing)"),
        (["--blend-source", "dog"], "'dog' is not a word of the source prompt 'a man is skiing'"),
        (["--cross-replace", "0.1", "--steps", "5"], "--cross-replace 0.1 of 5 steps controls none of them"),
        (["--cross-replace", "0.5", "--reweight", "dog=2", "--reweight", "dog=3"], "scales 'dog' twice"),
        # A word matches whatever its case and punctuation: so does its one scale.
        (["--cross-replace", "0.5", "--reweight", "dog=2", "--reweight", "DOG=3"], "scales 'DOG' twice"),
        (["--cross-replace", "0.5", "--reweight", "dog=2", "--reweight", "dog,=0"], "scales 'dog,' twice"),
        (["--cross-replace", "0.5", "--reweight", "is dog=2", "--reweight", "dog=3"], "(also as 'is dog')"),
        (["--cross-replace", "0.1", "--steps", "5"], "give at least 0.167"),  # the reference's N + 1 rows
        (["--self-replace", "0.19", "--steps", "5"], "--self-replace 0.19 of 5 steps controls none of them"),
        (["--blend-maps", "replaced", "--blend-edit", "dog"], "--blend-maps applies to --cross-replace"),
        (["--cross-replace", "0.5", "--blend-maps", "own"], "--blend-maps applies to --blend-edit"),
        (["--cross-replace", "0.5", "--blend-source", "-"], "'-' is not a word of the source prompt"),
        (["--control-scale", "0.5"], "--control-scale applies to --control"),
    ]
    for args, said in cases:
        code, out, err = run_tav("edit", "a dog is skiing", "-p", tuned, *args)
        assert code == 2 and out == "" and said in " ".join(err.split()) and "Traceback" not in err, (args, err)


def test_a_source_blend_word_is_refused_before_torch_is_imported(tuned: Path, tmp_path: Path) -> None:
    """The source prompt comes from the store (the current inversion's, else the tune's), read without torch."""
    argv = ["edit", "a dog is skiing", "-p", str(tuned), "--cross-replace", "0.5", "--blend-source", "'cat'"]
    torch_loaded, status, err = tav_in_fresh_python(argv, tmp_path)
    assert not torch_loaded and status == "2", err
    assert "is not a word of the source prompt 'a man is skiing'" in " ".join(err.split())


def test_every_control_option_is_in_the_key_and_a_plain_edit_keeps_its_key(tuned: Path, run_tav: RunTav) -> None:
    plain = _edit(run_tav, tuned, "a dog is skiing")
    spec = json.loads(Path(plain["sidecar"]).read_text())["edit"]
    assert "attention" not in spec  # keys made before attention control existed stay valid
    variants = [
        ["--cross-replace", "0.4"],
        ["--cross-replace", "0.6"],
        ["--cross-replace", "0.4", "--word-map", "refine"],
        ["--cross-replace", "0.4", "--reweight", "dog=3"],
        ["--self-replace", "0.6"],
        ["--self-replace", "0.6", "--self-attention", "spatial"],
        ["--blend-source", "man"],
        ["--blend-source", "man", "--blend-edit", "dog"],
        ["--cross-replace", "0.4", "--blend-edit", "dog", "--blend-maps", "replaced"],
        ["--cross-replace", "0.4", "--attention-from", "branch", "--inversion", "negative-prompt"],
    ]
    keys = {plain["key"]}
    for args in variants:
        record = _edit(run_tav, tuned, "a dog is skiing", *args)
        assert record["key"] not in keys, args
        keys.add(record["key"])
    assert _edit(run_tav, tuned, "a dog is skiing", *variants[-1])["cached"] is True


def test_a_word_swap_asked_of_unequal_prompts_refines_and_says_so(tuned: Path, run_tav: RunTav) -> None:
    code, _, err = run_tav(
        "edit",
        "a man is skiing at sunset",
        "-p",
        tuned,
        "--steps",
        "5",
        "--cross-replace",
        "0.4",
        "--word-map",
        "replace",
    )
    assert code == 0 and "refine" in err and "different counts" in " ".join(err.split()), err


@pytest.mark.slow
def test_a_controlled_edit_is_recorded_reproduced_rendered_again_and_batched(
    tuned: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    record = _edit(run_tav, tuned, "a dog is skiing", *CONTROL, "--blend-edit", "dog", "--reweight", "dog=2")
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    assert sidecar["edit"]["attention"]["blend_source"] == ["man"] and sidecar["inversion"]["prompt"] == SOURCE
    again = reproduce_in(run_tav, sidecar, tmp_path / "fresh.tav")[-1]
    assert again["key"] == record["key"] and Path(again["path"]).read_bytes() == Path(record["path"]).read_bytes()
    Path(record["path"]).unlink()
    code, out, err = run_tav("edit", "--from-sidecar", record["sidecar"])
    assert code == 0, err
    rendered = json.loads(out)
    assert rendered["key"] == record["key"] and Path(rendered["path"]).is_file()
    table = "{ steps = 5, cross_replace = 0.4, self_replace = 0.6, self_attention = 'both', blend_source = ['man'], "
    table += "blend_edit = ['dog'], reweight = ['dog=2'] }"
    code, out, err = run_tav("batch", one_job(tmp_path, tuned, ["a dog is skiing"], edit=table))
    assert code == 0, err
    assert [r["key"] for r in map(json.loads, out.splitlines()) if r.get("kind") == "edit"] == [record["key"]]
    jobs = one_job(tmp_path, tuned, ["a dog is skiing"], edit="{ blend_source = ['woman'] }")
    code, _, err = run_tav("batch", jobs)
    assert code == 1 and "field 'edit.blend_source' = woman: 'woman' is not a word" in err  # before any job runs


@pytest.mark.slow
def test_the_grid_shows_each_plain_edit_beside_its_controlled_one(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("edit", "a dog is skiing", "-p", tuned, "--steps", "5", *CONTROL, "--grid")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    grid = records[-1]
    assert grid["kind"] == "grid" and grid["prompts"] == ["a dog is skiing", "a dog is skiing (attention control)"]
    assert len({r["key"] for r in records if r["kind"] == "edit"}) == 2


@pytest.mark.slow
def test_frames_all_of_the_tuned_selection_is_the_same_controlled_edit(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "all.tav"
    every_16th = ["--frames", "3", "--stride", "16"]  # frames 0, 16 and 32 of 48: all of them at stride 16
    tav_ok(
        "tune",
        CLIP,
        SOURCE,
        "--model",
        "tiny",
        *every_16th,
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "5",
        "-p",
        project,
    )
    tuned = _edit(run_tav, project, "a dog is skiing", *CONTROL)
    everything = _edit(run_tav, project, "a dog is skiing", *CONTROL, "--frames", "all", "--stride", "16")
    assert everything["key"] == tuned["key"] and everything["cached"] is True
    windowed = _edit(run_tav, project, "a dog is skiing", *CONTROL, "--window", "2")
    assert windowed["key"] != tuned["key"] and Path(windowed["path"]).is_file()
    # The source prompt is the inversion's, when `tav invert --prompt` gave it one.
    tav_ok("invert", "-p", project, "--steps", "5", "--prompt", "a skier on snow")
    code, _, err = run_tav("edit", "a dog is skiing", "-p", project, "--steps", "5", *CONTROL)
    assert code == 2 and "'man' is not a word of the source prompt 'a skier on snow'" in " ".join(err.split())
    other = _edit(run_tav, project, "a dog is skiing", "--cross-replace", "0.4", "--blend-source", "skier")
    assert json.loads(Path(other["sidecar"]).read_text())["inversion"]["prompt"] == "a skier on snow"
