"""Batch validation checks what the command line checks, before any job runs, and names batch fields; the
cross-field rules of previews and LoRA names are one rule for both; a sidecar names the LoRA that changed."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from tavcli.batch import check_frames, parse_jobs

from .conftest import CLIP, RunTav, edit_record, tav_in_fresh_python

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


def _problems(tmp_path: Path, **fields: object) -> list[str]:
    """What validation (the fields, then the clip's frames) says of one job on the bundled 48-frame clip."""
    job = {"clip": str(CLIP), "prompt": "a man", "model": "tiny", "edits": ["a dog"], **fields}
    _, problems = parse_jobs(json.dumps(job), "jobs.jsonl", tmp_path, jsonl=True, check=check_frames)
    return [str(problem) for problem in problems]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"eval": True}, "field 'eval' scores the previews: give field 'preview' too"),
        ({"preview_every": 20}, "field 'preview_every' applies to previews: give field 'preview' too"),
        ({"preview_steps": 3}, "field 'preview_steps' applies to previews: give field 'preview' too"),
        ({"preview": ""}, "field 'preview'"),
        ({"preview": "   "}, "field 'preview'"),
    ],
)
def test_preview_fields_are_checked_together_at_validation(tmp_path: Path, fields: dict, words: str) -> None:
    problems = _problems(tmp_path, **fields)
    assert len(problems) == 1 and words in problems[0], problems


def test_a_job_with_previews_and_eval_passes(tmp_path: Path) -> None:
    assert _problems(tmp_path, preview="a dog", preview_every=1, eval=True) == []


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"frames": "all", "start": 48}, "field 'edit.start' = 48 is past the clip's last frame (48 frames)"),
        ({"start": 1000}, "field 'edit.start' = 1000"),
        ({"frames": 30, "stride": 2}, "fields 'edit.frames' = 30, 'edit.stride' = 2"),
    ],
)
def test_edited_frames_past_the_clip_are_found_at_validation_and_name_the_field(
    tmp_path: Path, edit: dict, words: str
) -> None:
    problems = _problems(tmp_path, frames=2, edit=edit)
    assert len(problems) == 1 and words in problems[0] and "--start" not in problems[0], problems
    assert "48" in problems[0]


def test_edited_frames_inside_the_clip_pass_and_the_tuned_frames_are_checked_too(tmp_path: Path) -> None:
    assert _problems(tmp_path, frames=2, edit={"frames": "all", "start": 40, "stride": 3}) == []
    assert _problems(tmp_path, frames=2, edit={"frames": 24, "stride": 2}) == []
    assert "has 48 frames, too few" in _problems(tmp_path, frames=30, stride=2)[0]
    assert "no such file" in _problems(tmp_path, clip=str(tmp_path / "nope.mp4"))[0]


def test_a_batch_lora_error_names_the_field(tmp_path: Path, tiny_lora: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"lora": [f"{tiny_lora}:nan"]}, "lora"),
        ({"edit": {"lora": [f"{tiny_lora}:inf"]}}, "edit.lora"),
    ]
    for fields, field in cases:
        problems = _problems(tmp_path, **fields)
        assert len(problems) == 1 and f"field '{field}'" in problems[0] and "--lora" not in problems[0], problems
    missing = _problems(tmp_path, edit={"lora": [str(tmp_path / "missing.safetensors")]})  # found before any work
    assert len(missing) == 1 and "no LoRA at" in missing[0] and "field 'edit.lora'" in missing[0], missing


def test_a_lora_file_whose_name_ends_in_a_scale_is_named_with_its_own_scale(tmp_path: Path, tiny_lora: Path) -> None:
    from tavcli.errors import TavError
    from tavcli.models.names import model_name, parse_model_name

    odd = tmp_path / "style:0.5"
    shutil.copy(tiny_lora, odd)
    with pytest.raises(TavError) as refused:  # `style:0.5` is `style` at scale 0.5, and there is no `style`
        model_name("tiny", loras=[str(odd)])
    assert refused.value.hint is not None and f"{odd}:1" in refused.value.hint, refused.value
    named = model_name("tiny", loras=[f"{odd}:1"])
    assert parse_model_name(named).loras == ((odd.resolve(), 1.0),)
    assert parse_model_name(model_name("tiny", loras=[f"{odd}:0.25"])).loras == ((odd.resolve(), 0.25),)


def test_the_lora_name_rule_is_the_same_for_tav_edit(tmp_path: Path, tiny_lora: Path, run_tav: RunTav) -> None:
    odd = tmp_path / "style:0.5"
    shutil.copy(tiny_lora, odd)
    code, _, err = run_tav("edit", "a dog", "-p", tmp_path / "nowhere.tav", "--lora", odd)
    assert code == 1 and "no LoRA at" in err and f"{odd}:1" in err, err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--eval"], "--eval scores the previews: give --preview PROMPT too"),
        (["--preview-every", "20"], "--preview-every applies to previews: give --preview PROMPT too"),
        (["--preview-every", "100"], "--preview-every applies to previews"),  # the default, given: still refused
        (["--preview-steps", "3"], "--preview-steps applies to previews"),
        (["--preview", ""], "--preview"),
    ],
)
def test_preview_options_without_a_preview_are_usage_errors_before_torch(
    tmp_path: Path, extra: list[str], words: str
) -> None:
    argv = ["tune", str(CLIP), "a man", *SMALL, "-p", str(tmp_path / "p.tav"), *extra]  # quick if it ran
    torch_loaded, status, err = tav_in_fresh_python(argv, tmp_path)
    assert not torch_loaded and status == "2", err
    assert err.startswith("error: ") and words in err and "Traceback" not in err


@pytest.mark.slow
def test_a_dry_run_refuses_eval_without_preview_before_loading_anything(tmp_path: Path, run_tav: RunTav) -> None:
    job = {"clip": str(CLIP), "prompt": "a man", "model": "tiny", "frames": 2, "width": 32, "height": 32, "eval": True}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl", "--dry-run")
    assert code == 1 and out == "" and "field 'eval' scores the previews" in err and "loading model" not in err


@pytest.mark.slow
def test_from_sidecar_names_the_lora_that_changed(
    tmp_path: Path, tiny_lora: Path, tiny_query_lora: Path, run_tav: RunTav
) -> None:
    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    lora = tmp_path / "style.safetensors"
    shutil.copy(tiny_lora, lora)
    styled = edit_record(run_tav, project, "--steps", "1", "--lora", lora)
    shutil.copy(tiny_query_lora / "pytorch_lora_weights.safetensors", lora)  # another LoRA under the same name
    code, _, err = run_tav("edit", "--from-sidecar", styled["sidecar"], "--precision", "fp32")
    assert code == 1 and f"the LoRA {lora} changed since" in err and "precision" not in err, err


@pytest.mark.parametrize(
    ("fields", "field"), [({"project": "taken"}, "project"), ({"edit": {"out": "taken"}}, "edit.out")]
)
def test_a_project_or_output_folder_that_is_a_file_is_refused_at_validation(
    tmp_path: Path, run_tav: RunTav, fields: dict, field: str
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    assert _problems(tmp_path, **fields) == [
        f"jobs.jsonl line 1 (job-1): field '{field}' {taken} is a file, not a folder"
    ]
    small = {"model": "tiny", "frames": 2, "width": 32, "height": 32, "steps": 1, "edits": ["a dog"]}
    good = {"name": "good", "clip": str(CLIP), "prompt": "a man", "project": str(tmp_path / "p.tav"), **small}
    bad = {"name": "bad", "clip": str(CLIP), "prompt": "a man", "project": str(tmp_path / "q.tav"), **small, **fields}
    (tmp_path / "jobs.jsonl").write_text(f"{json.dumps(bad)}\n{json.dumps(good)}\n")
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl", "--dry-run", "--keep-going")
    assert code == 1 and "--out" not in err and "--project" not in err, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["job"], r["kind"]) for r in records if r.get("error")] == [("bad", "job")]
    assert f"field '{field}' {taken} is a file" in records[0]["error"]
    assert {r["job"] for r in records if "action" in r} == {"good"}


DEEP = "[" * 100_000 + "]" * 100_000
GOOD_LINE = json.dumps({"clip": "c.mp4", "prompt": "a man"})
DEEP_LINE = GOOD_LINE[:-1] + f', "edits": {DEEP}}}'


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("jobs.jsonl", f"{GOOD_LINE}\n{DEEP_LINE}\n", "line 2"),
        ("jobs.jsonl", GOOD_LINE[:-1] + f', "x": {"[" * 900 + "]" * 900}}}', "line 1"),  # readable, still refused
        ("jobs.toml", f"a = {DEEP}\n", "line 1"),
        ("jobs.toml", f'[[job]]\nclip = "c.mp4"\nprompt = "p"\nedits = {DEEP}\n', "line 4"),
        ("jobs.toml", '[[job]]\nclip = "c.mp4"\nprompt = "p"\nedits = [\n' + "[" * 50 + "]" * 51 + "\n", "job 1"),
        (
            "jobs.toml",
            "[defaults]\nedit = " + "{ a = " * 40 + "1" + " }" * 40 + '\n[[job]]\nclip = "c"\n',
            "[defaults]",
        ),
        ("-", f"{GOOD_LINE}\n\n{DEEP_LINE}\n", "line 3"),
    ],
)
def test_deeply_nested_input_is_one_line_naming_where(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch, name: str, text: str, where: str
) -> None:
    if name == "-":
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
    else:
        (tmp_path / name).write_text(text)
    code, out, err = run_tav("batch", name if name == "-" else tmp_path / name)
    assert code == 1 and out == "" and "Traceback" not in err, err[-500:]
    [line] = err.splitlines()
    source = "stdin" if name == "-" else tmp_path / name
    assert line.startswith(f"error: {source} {where}: lists and tables nested more than 32 levels deep"), line
