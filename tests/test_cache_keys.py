"""A cached result is reused only when it is the result asked for: every option of `tav edit` changes the
key, the output's name or folder, or nothing, as docs/store.md says; the sidecar's `reproduce` commands
give the same bits in a fresh project."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import pytest
import torch

from .conftest import CLIP, RunTav, reproduce_in, tav_commands

if TYPE_CHECKING:
    from tavcli.settings.tuning import TuneSettings

ROOT = Path(__file__).parent.parent
SMALL = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]
Args = Callable[[dict[str, Path]], list[str]]


def documented_effects() -> dict[tuple[str, str], str]:
    """(command, option) -> key, name, folder or none, from the table in docs/store.md."""
    effects = {}
    for line in (ROOT / "docs" / "store.md").read_text().splitlines():
        row = re.match(r"\| `tav (\w+)` \| (.+?) \| (key|name|folder|none) \|", line)
        if row:
            for option in re.findall(r"`([^`]+)`", row.group(2)):
                effects[(row.group(1), option)] = row.group(3)
    return effects


def command_options(name: str) -> list[str]:
    """The arguments and options of `tav NAME`, as the docs name them (`VIDEO`, `--steps`)."""
    command = tav_commands()[name]
    found = []
    for param in command.params:
        if param.param_type_name == "argument":
            found.append((param.metavar or param.name.upper()).rstrip("."))
        else:
            found.append(next(flag for flag in param.opts if flag.startswith("--")))
    return [option for option in found if option != "--help"]


@pytest.mark.parametrize("command", ["tune", "invert", "edit"])
def test_every_option_says_what_it_does_to_the_cache(command: str) -> None:
    effects = documented_effects()
    missing = [option for option in command_options(command) if (command, option) not in effects]
    assert not missing, f"docs/store.md does not say what these do to the cache: {missing}"


# Each edit option: (extra arguments of the baseline edit, of the changed edit). `P` holds paths.
BASE = ["--steps", "2"]
_both = ["--self-attention", "both"]
CHANGES: dict[str, tuple[Args, Args]] = {
    "PROMPT": (lambda p: [], lambda p: ["--replace-prompt"]),
    "--project": (lambda p: [], lambda p: ["-p", str(p["other_project"])]),
    "--steps": (lambda p: [], lambda p: ["--steps", "3"]),
    "--guidance": (lambda p: [], lambda p: ["--guidance", "5"]),
    "--negative": (lambda p: [], lambda p: ["--negative", "blurry"]),
    "--seed": (lambda p: ["--eta", "0.5"], lambda p: ["--eta", "0.5", "--seed", "7"]),
    "--eta": (lambda p: [], lambda p: ["--eta", "0.5"]),
    "--guidance-rescale": (lambda p: [], lambda p: ["--guidance-rescale", "0.7"]),
    "--inversion": (lambda p: [], lambda p: ["--inversion", "negative-prompt"]),
    "--null-iterations": (
        lambda p: ["--inversion", "null-text"],
        lambda p: ["--inversion", "null-text", "--null-iterations", "2"],
    ),
    "--null-lr": (lambda p: ["--inversion", "null-text"], lambda p: ["--inversion", "null-text", "--null-lr", "0.1"]),
    "--cross-replace": (lambda p: [], lambda p: ["--cross-replace", "0.5"]),
    "--self-replace": (lambda p: [], lambda p: ["--self-replace", "0.5"]),
    "--self-attention": (lambda p: ["--self-replace", "0.5"], lambda p: ["--self-replace", "0.5", *_both]),
    "--word-map": (lambda p: ["--cross-replace", "0.5"], lambda p: ["--cross-replace", "0.5", "--word-map", "refine"]),
    "--reweight": (lambda p: ["--cross-replace", "0.5"], lambda p: ["--cross-replace", "0.5", "--reweight", "dog=2"]),
    "--blend-source": (lambda p: [], lambda p: ["--blend-source", "man"]),
    "--blend-edit": (lambda p: [], lambda p: ["--blend-edit", "dog"]),
    "--blend-maps": (
        lambda p: ["--cross-replace", "0.5", "--blend-edit", "dog"],
        lambda p: ["--cross-replace", "0.5", "--blend-edit", "dog", "--blend-maps", "replaced"],
    ),
    "--attention-from": (
        lambda p: ["--inversion", "negative-prompt", "--cross-replace", "0.5"],
        lambda p: ["--inversion", "negative-prompt", "--cross-replace", "0.5", "--attention-from", "branch"],
    ),
    "--format": (lambda p: [], lambda p: ["--format", "gif"]),
    "--fps": (lambda p: [], lambda p: ["--fps", "5"]),
    "--out": (lambda p: [], lambda p: ["--out", str(p["tmp"] / "elsewhere")]),
    "--batch-size": (
        lambda p: ["--also", "a cat is skiing"],
        lambda p: ["--also", "a cat is skiing", "--batch-size", "2"],
    ),
    "--control": (lambda p: [], lambda p: [*_control(p)]),
    "--control-model": (lambda p: [*_control(p)], lambda p: [*_control(p, model=p["other_controlnet"])]),
    "--control-video": (lambda p: [*_control(p)], lambda p: [*_control(p, video=p["maps"])]),
    "--control-scale": (lambda p: [*_control(p)], lambda p: [*_control(p), "--control-scale", "0.5"]),
    "--device": (lambda p: [], lambda p: ["--device", "cpu"]),
    "--frames": (lambda p: [], lambda p: ["--frames", "6"]),
    "--stride": (lambda p: [], lambda p: ["--stride", "1"]),
    "--start": (lambda p: [], lambda p: ["--start", "2"]),
    "--window": (lambda p: ["--frames", "6"], lambda p: ["--frames", "6", "--window", "3"]),
    "--tune-step": (lambda p: [], lambda p: ["--tune-step", "1"]),
    "--lora": (lambda p: [], lambda p: ["--lora", str(p["lora"])]),
    "--grid": (lambda p: [], lambda p: ["--grid"]),
    "--eval": (lambda p: [], lambda p: ["--eval", "--clip-model", str(p["clip_model"])]),
    "--clip-model": (
        lambda p: ["--eval", "--clip-model", str(p["clip_model"])],
        lambda p: ["--eval", "--clip-model", str(p["other_clip"])],
    ),
    "--from-sidecar": (lambda p: [], lambda p: ["--from-sidecar"]),
    "--trust-pickle": (lambda p: [], lambda p: ["--trust-pickle"]),
    "--force": (lambda p: [], lambda p: ["--force"]),
    "--quiet": (lambda p: [], lambda p: ["--quiet"]),
}
# Options whose other values cannot run on a 2-core CPU in a test: their keys are checked directly below.
NOT_RUN_HERE = {"--compile": "compiling takes minutes on a CPU", "--precision": "fp16 and bf16 need a GPU"}


def _control(paths: dict[str, Path], model: Path | None = None, video: Path | None = None) -> list[str]:
    return [
        "--control",
        "pose",
        "--control-model",
        str(model or paths["controlnet"]),
        "--control-video",
        str(video or CLIP),
    ]


@pytest.fixture(scope="module")
def edit_world(
    tmp_path_factory: pytest.TempPathFactory, tiny_controlnet: Path, tiny_clip: Path, tiny_lora: Path
) -> dict[str, Path]:
    """A tuned project (its state at step 1 kept), a copy of it, a second ControlNet and CLIP model, a second
    condition clip, and a LoRA."""
    from tavcli.cli import main

    tmp = tmp_path_factory.mktemp("edit-world")
    project = tmp / "p.tav"
    preview = ["--preview", "a dog", "--preview-every", "1", "--preview-steps", "1"]
    _run(main, "tune", CLIP, "a man is skiing", *SMALL, *preview, "-p", project)
    _run(main, "invert", "-p", project, "--steps", "2")
    shutil.copytree(project, tmp / "other.tav")
    shutil.copytree(tiny_controlnet, tmp / "controlnet-2")
    config = json.loads((tmp / "controlnet-2" / "config.json").read_text())
    (tmp / "controlnet-2" / "config.json").write_text(json.dumps({**config, "conditioning_channels": 3, "_note": 2}))
    shutil.copytree(tiny_clip, tmp / "clip-2")
    maps = tmp / "maps.mp4"
    shutil.copy(CLIP, maps)
    with maps.open("ab") as file:
        file.write(b"\0")  # another file's bytes, the same frames
    return {
        "tmp": tmp,
        "project": project,
        "other_project": tmp / "other.tav",
        "controlnet": tiny_controlnet,
        "other_controlnet": tmp / "controlnet-2",
        "clip_model": tiny_clip,
        "other_clip": tmp / "clip-2",
        "maps": maps,
        "lora": tiny_lora,
    }


def _run(main: Callable[[], None], *args: object) -> None:
    import sys

    sys.argv = ["tav", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, args


def _edit(run_tav: RunTav, world: dict[str, Path], extra: list[str], prompt: str = "a dog is skiing") -> dict:
    if "--from-sidecar" in extra:
        base = _edit(run_tav, world, [], prompt)
        args = ["edit", "--from-sidecar", base["sidecar"]]
    else:
        extra = list(extra)
        prompts = [prompt]
        if "--replace-prompt" in extra:
            extra.remove("--replace-prompt")
            prompts = ["a cat is skiing on the moon"]
        if "--also" in extra:
            index = extra.index("--also")
            prompts.append(extra[index + 1])
            del extra[index : index + 2]
        args = ["edit", *prompts, "-p", world["project"], *BASE, *extra]
    code, out, err = run_tav(*args)
    assert code == 0, err
    return next(json.loads(line) for line in out.splitlines() if json.loads(line)["kind"] == "edit")


def _observed(before: dict, after: dict) -> str:
    if before["key"] != after["key"]:
        return "key"
    if Path(before["path"]).parent != Path(after["path"]).parent:
        return "folder"
    return "name" if before["path"] != after["path"] else "none"


@pytest.mark.slow
@pytest.mark.parametrize("option", list(CHANGES))
def test_each_edit_option_does_what_the_docs_say(option: str, edit_world: dict[str, Path], run_tav: RunTav) -> None:
    base_args, changed_args = CHANGES[option]
    before = _edit(run_tav, edit_world, base_args(edit_world))
    after = _edit(run_tav, edit_world, changed_args(edit_world))
    assert _observed(before, after) == documented_effects()[("edit", option)], (before, after)
    if _observed(before, after) == "none":
        assert Path(after["path"]).read_bytes() == Path(before["path"]).read_bytes()


def test_every_edit_option_is_run_or_checked_by_key() -> None:
    assert set(command_options("edit")) == set(CHANGES) | set(NOT_RUN_HERE)


def test_options_not_run_here_are_in_the_keys(tmp_path: Path) -> None:
    from tavcli.runtime import Runtime
    from tavcli.settings.sampling import EditSettings
    from tavcli.store.project import Project
    from tavcli.workflow.keys import edit_spec, inversion_entry, tune_spec

    project, cpu = Project(tmp_path), torch.device("cpu")
    plain = Runtime(cpu, "fp32")
    edit = project.entry("edits", edit_spec("1" * 16, "a dog", EditSettings(), plain))
    assert not {"batch", "compile", "control"} & set(edit.spec)  # absent fields keep earlier stores' keys
    for runtime in (Runtime(cpu, "bf16"), Runtime(cpu, "fp16"), Runtime(cpu, "fp32", compile=True)):
        assert project.entry("edits", edit_spec("1" * 16, "a dog", EditSettings(), runtime)).key != edit.key
        assert (
            inversion_entry(project, "1" * 16, 2, "", runtime).key
            != inversion_entry(project, "1" * 16, 2, "", plain).key
        )
    assert project.entry("edits", edit_spec("1" * 16, "a dog", EditSettings(), plain, batch=2)).key != edit.key
    assert "compile" in tune_spec("1" * 16, "a man", _tune_settings(), "fp32", compiled=True)


def test_minus_zero_is_zero_in_every_key(tmp_path: Path) -> None:
    """`--guidance -0` is `--guidance 0`: the same edit, one entry (JSON would write -0.0 and key it apart)."""
    from tavcli.runtime import Runtime
    from tavcli.settings.attention import AttentionSettings
    from tavcli.settings.sampling import EditSettings
    from tavcli.store.project import Project
    from tavcli.workflow.keys import edit_spec

    project, plain = Project(tmp_path), Runtime(torch.device("cpu"), "fp32")

    def key(settings: EditSettings) -> str:
        return project.entry("edits", edit_spec("1" * 16, "a dog", settings, plain)).key

    assert key(EditSettings(guidance=-0.0)) == key(EditSettings(guidance=0.0))
    assert key(EditSettings(eta=-0.0, guidance_rescale=-0.0)) == key(EditSettings(eta=0.0, guidance_rescale=0.0))
    attention = AttentionSettings(cross_replace=0.5, self_replace=-0.0)
    assert attention.changed() == {"cross_replace": 0.5} and "-0.0" not in json.dumps(asdict(attention))


def _tune_settings() -> TuneSettings:
    from tavcli.settings.tuning import TuneSettings

    return TuneSettings()


def _rate(path: Path) -> Fraction:
    with av.open(str(path)) as container:
        return Fraction(container.streams.video[0].average_rate)


@pytest.mark.slow
def test_fps_renders_its_own_file_and_never_replaces_the_source_rate_one(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "f.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    edit: list[str | Path] = ["edit", "a panda", "-p", project, "--steps", "2"]
    first = json.loads(run_tav(*edit)[1])
    slow = json.loads(run_tav(*edit, "--fps", "2")[1])
    again = json.loads(run_tav(*edit)[1])
    assert slow["path"] != first["path"] and slow["cached"] is False and _rate(Path(slow["path"])) == 2
    assert again["path"] == first["path"] and again["cached"] is True
    assert _rate(Path(again["path"])) == Fraction(30000, 1001) / 2
    Path(first["path"] + ".json").write_text(json.dumps({"edit": {"key": "x"}}))  # a sidecar of something else
    redone = json.loads(run_tav(*edit)[1])
    assert redone["cached"] is False and json.loads(Path(redone["sidecar"]).read_text())["edit"]["key"] == first["key"]


@pytest.mark.slow
def test_reproduce_commands_give_the_same_bits_in_a_fresh_project(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "original.tav"
    assert run_tav("tune", CLIP, "a man is skiing", *SMALL, "-p", project)[0] == 0
    assert run_tav("invert", "-p", project, "--steps", "2", "--prompt", "a man is skiing")[0] == 0
    code, out, err = run_tav(
        "edit", "a panda is skiing", "a dog is skiing", "-p", project, "--steps", "2", "--batch-size", "2",
        "--negative", "blurry", "--fps", "10", "--format", "gif",
    )  # fmt: skip
    assert code == 0, err
    original = json.loads(out.splitlines()[0])
    sidecar = json.loads(Path(original["sidecar"]).read_text())
    assert "--prompt 'a man is skiing'" in sidecar["reproduce"][1]
    fresh = tmp_path / "fresh.tav"
    again = reproduce_in(run_tav, sidecar, fresh)[0]
    assert again["key"] == original["key"] and Path(again["path"]).name == Path(original["path"]).name
    assert Path(again["path"]).read_bytes() == Path(original["path"]).read_bytes()
    payload = Path("edits") / original["key"] / "tensors.safetensors"
    assert (fresh / payload).read_bytes() == (project / payload).read_bytes()


def test_inversions_carry_their_formula_so_old_ones_go_stale(tmp_path: Path) -> None:
    """v-prediction inversions changed numbers (formula 2): an inversion stored before must not be reused."""
    from tavcli.runtime import Runtime
    from tavcli.store.project import Project
    from tavcli.workflow.keys import INVERSION_FORMULA, inversion_entry

    entry = inversion_entry(Project(tmp_path), "1" * 16, 2, "", Runtime(torch.device("cpu"), "fp32"))
    assert entry.spec["formula"] == INVERSION_FORMULA == 2
    before = Project(tmp_path).entry("inversions", {k: v for k, v in entry.spec.items() if k != "formula"})
    assert before.key != entry.key
