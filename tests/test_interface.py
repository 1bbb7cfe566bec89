"""One interface style across commands: what goes to stdout and stderr, -q everywhere, help that reads
well, the batch schema as data, and hub models' --revision and --variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import CLIP, TINY_SD, RunTav, tav_commands

SMALL = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]


@pytest.mark.parametrize("name", sorted(tav_commands()))
def test_help_has_consistent_metavars_and_quiet(name: str, run_tav: RunTav) -> None:
    code, out, _ = run_tav(name, "--help")
    assert code == 0 and "-q, --quiet" in out
    for python_type in ("<str>", "<path>", "<list[", "<int>", "<float>", "<bool>", "{folder}", "{video}", "{prompt}"):
        assert python_type not in out, f"tav {name} --help shows {python_type}"


def test_main_help_summaries_are_whole_and_main_commands_have_examples(run_tav: RunTav) -> None:
    code, out, _ = run_tav("--help")
    summaries = out.split("Commands:")[1].strip().splitlines()
    assert len(summaries) == len(tav_commands()) and not any(line.rstrip().endswith("...") for line in summaries)
    for name in ("tune", "invert", "edit", "batch"):
        assert "Example" in run_tav(name, "--help")[1], name


@pytest.fixture
def tuned(tmp_path: Path, run_tav: RunTav) -> Path:
    project = tmp_path / "p.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    return project


def test_reporting_commands_print_json_lines_when_stdout_is_no_terminal(tuned: Path, run_tav: RunTav) -> None:
    cases: tuple[list[str | Path], ...] = (["ls", "-p", tuned], ["verify", "-p", tuned], ["config", "-p", tuned])
    for args in cases:
        code, out, err = run_tav(*args)  # the tests capture stdout: it is no terminal
        assert code == 0 and out and all(isinstance(json.loads(line), dict) for line in out.splitlines()), args
        assert err.strip(), args  # the table and summary for people stay on stderr


def test_quiet_leaves_results_and_errors_only(tuned: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "1", "-q")
    assert code == 0 and json.loads(out)["kind"] == "edit" and err == ""
    code, out, err = run_tav("ls", "-p", tuned, "-q")
    assert code == 0 and out and err == ""
    code, out, err = run_tav("edit", "a dog", "-p", tuned, "--steps", "0", "-q")
    assert code == 2 and err.startswith("error: --steps")


def test_batch_schema_is_the_declarations(tmp_path: Path, run_tav: RunTav) -> None:
    import jsonschema

    from tavcli.settings.options import EDIT, INVERT, TUNE

    code, out, _ = run_tav("batch", "--schema")
    assert code == 0
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    job = schema["$defs"]["Job"]
    assert set(job["required"]) == {"clip", "prompt"} and "model_config" in job["properties"]
    for table, options in (("Job", TUNE), ("Invert", INVERT), ("Edit", EDIT)):
        for name, option in options.items():
            field = schema["$defs"][table]["properties"][name]
            text = json.dumps(field)
            assert option.help in text
            if option.high is not None:
                assert f'"maximum": {option.high}' in text, (table, name)
    good = {"job": [{"clip": "a.mp4", "prompt": "a man", "edits": ["a dog"], "edit": {"guidance": 7.5}}]}
    jsonschema.validate(good, schema)
    for bad in ({"clip": "a.mp4"}, {"clip": "a.mp4", "prompt": "p", "edit": {"steps": 0}}, {"clip": 1, "prompt": "p"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"job": [bad]}, schema)


@pytest.fixture(scope="module")
def variant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's tiny model with fp16 weights beside its main ones, as hub models ship them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path_factory.mktemp("variant") / "tiny-sd"
    shutil.copytree(TINY_SD, folder)
    for part, kind in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        kind.from_pretrained(folder / part).half().save_pretrained(folder / part, variant="fp16")
    return folder


def test_variant_loads_those_weights_and_is_recorded(variant_model: Path, tmp_path: Path, run_tav: RunTav) -> None:
    import torch

    from tavcli.models.loading import load_components
    from tavcli.models.resolving import resolve_model

    plain, fp16 = resolve_model(str(variant_model)), resolve_model(f"{variant_model}|variant=fp16")
    assert fp16.name.endswith("|variant=fp16") and plain.name == str(variant_model)
    weights = load_components(fp16, torch.device("cpu"), torch.float32).unet.state_dict()
    main = load_components(plain, torch.device("cpu"), torch.float32).unet.state_dict()
    assert all(torch.equal(weights[name], main[name].half().float()) for name in main)  # the fp16 file's values
    assert resolve_model(str(variant_model), prefer_fp16=True).name.endswith(
        "|variant=fp16"
    )  # a half-precision tune's choice
    assert resolve_model(f"{variant_model}|variant=none", prefer_fp16=True).name.endswith("|variant=none")

    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.session import Session

    session = Session(resolve_runtime("cpu", "fp32"))  # one process, both variants: never each other's weights
    loaded = {name: session.model(name).unet.state_dict() for name in (str(variant_model), fp16.name)}
    assert not all(torch.equal(loaded[fp16.name][k], loaded[str(variant_model)][k]) for k in main)
    assert session.source(str(variant_model)).name == str(variant_model)  # a recorded name: the main weights

    project = tmp_path / "v.tav"
    args: list[str | Path] = ["tune", CLIP, "a man", "--model", variant_model, *SMALL[2:], "-p", project]
    code, out, err = run_tav(*args, "--variant", "fp16")
    assert code == 0, err
    meta = json.loads((Path(json.loads(out.splitlines()[-1])["path"]) / "meta.json").read_text())
    assert meta["model"]["model"].endswith("|variant=fp16")
    code, _, err = run_tav(*args, "--variant", "bf16")
    assert code == 1 and "has no bf16 weights" in err
    job: dict[str, object] = {
        "clip": str(CLIP),
        "prompt": "a man",
        "model": str(variant_model),
        "variant": "fp16",
        "project": str(project),
    }
    job |= {"frames": 2, "width": 32, "height": 32, "steps": 1}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    code, out, err = run_tav("batch", tmp_path / "jobs.jsonl")
    assert code == 0 and json.loads(out.splitlines()[-1])["cached"] is True, err  # the same tune as the command
    code, _, err = run_tav("tune", CLIP, "a man", *SMALL, "--variant", "fp16", "-p", project)
    assert code == 1 and "tiny model has no fp16 weights" in err


def test_revision_reaches_the_hub_download_and_the_tune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_tav: RunTav
) -> None:
    import huggingface_hub

    calls: list[dict[str, object]] = []
    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(TINY_SD, snapshot)

    def download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    project = tmp_path / "r.tav"
    code, out, err = run_tav(
        "tune", CLIP, "a man", "--model", "org/tiny-sd", "--revision", "v1.0", *SMALL[2:], "-p", project
    )
    assert code == 0, err
    assert calls and all(call["repo_id"] == "org/tiny-sd" and call["revision"] == "v1.0" for call in calls)
    assert not any("token" in call or "cache_dir" in call for call in calls)  # HF_TOKEN and HF_HOME apply as in hf
    meta = json.loads((Path(json.loads(out.splitlines()[-1])["path"]) / "meta.json").read_text())
    assert meta["model"] == {"model": "org/tiny-sd|revision=v1.0", "revision": "0123abcd"}
    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "1")
    assert code == 0, err
    assert (
        "--model org/tiny-sd --revision v1.0"
        in json.loads(Path(json.loads(out)["sidecar"]).read_text())["reproduce"][0]
    )
    code, _, err = run_tav("tune", CLIP, "a man", *SMALL, "--revision", "v1.0", "-p", project)
    assert code == 1 and "--revision only applies to hub models" in err
