"""The documentation describes the real program: every option, the Python example, the demo."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest

from .conftest import CLIP, RunTav, tav_commands

ROOT = Path(__file__).parent.parent


def test_every_command_option_is_documented() -> None:
    reference = (ROOT / "docs" / "cli.md").read_text()
    for name, command in tav_commands().items():
        assert f"## `tav {name}" in reference, name
        for param in command.params:
            for flag in param.opts:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in reference, f"tav {name} {flag} is not in docs/cli.md"


def _modules() -> list[str]:
    import pkgutil

    import tavcli

    found = [info.name for info in pkgutil.walk_packages(tavcli.__path__, "tavcli.")]
    return sorted(name for name in found if not name.endswith("__main__"))


@pytest.mark.parametrize("module", _modules())
def test_public_names_exist(module: str) -> None:
    imported = importlib.import_module(module)
    if not hasattr(imported, "__all__"):  # only a layer's package may be a bare namespace of modules
        assert hasattr(imported, "__path__") and imported.__doc__, module
        return
    assert imported.__all__ and all(hasattr(imported, name) for name in imported.__all__)


@pytest.mark.slow
def test_python_api_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "docs" / "python.md").read_text()
    example = re.search(r"## Whole commands\s+```python\n(.*?)```", text, re.S)
    assert example is not None
    monkeypatch.chdir(tmp_path)
    shutil.copy(CLIP, tmp_path / "ski.mp4")
    exec(compile(example.group(1), "docs/python.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[0].endswith(".mp4") and Path(printed[0]).is_file() and printed[1] == "False"


@pytest.mark.slow
def test_demo_renders_two_clips(tmp_path: Path, run_tav: RunTav) -> None:
    code, out, err = run_tav("demo", "-p", tmp_path / "demo.tav", "--steps", "2")
    assert code == 0, err
    edits = [r for r in map(json.loads, out.splitlines()) if r["kind"] == "edit"]
    assert len(edits) == 2 and all(Path(r["path"]).stat().st_size > 0 for r in edits)


def test_weight_patterns_skip_variants_that_are_never_loaded() -> None:
    from fnmatch import fnmatch

    from tavcli.models.resolving import weight_files

    def kept(part: str, name: str, allow_pickle: bool = False) -> bool:
        return any(fnmatch(name, pattern) for pattern in weight_files(part, allow_pickle))

    assert kept("unet", "diffusion_pytorch_model.safetensors")
    assert kept("unet", "diffusion_pytorch_model-00001-of-00002.safetensors")
    assert kept("text_encoder", "model.safetensors")
    assert not kept("unet", "diffusion_pytorch_model.fp16.safetensors")
    assert not kept("unet", "diffusion_pytorch_model.non_ema.safetensors")
    assert not kept("unet", "diffusion_pytorch_model.bin")
    assert kept("unet", "diffusion_pytorch_model.bin", allow_pickle=True)
    assert kept("text_encoder", "pytorch_model.bin", allow_pickle=True)


def test_every_repository_path_the_docs_and_code_name_exists() -> None:
    """`docs/method.md`, `tests/TEST.py`, `tavcli/...`: a path named in a doc, a docstring or a comment
    is one the repository has (placeholders in capitals, such as `tavcli/tiny/PART.json`, excepted)."""
    named = re.compile(r"(?<![\w./-])((?:docs|tests|benchmarks|tavcli|\.ci)/[\w./-]*\w)")
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *(ROOT / "tavcli").rglob("*.py")]
    sources += [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"), ROOT / ".ci" / "run"]
    missing = []
    for source in sources:
        for match in named.finditer(source.read_text()):
            path = match.group(1).rstrip(".")
            if not any(part.isupper() for part in re.split(r"[/.]", path)) and not (ROOT / path).exists():
                missing.append(f"{source.relative_to(ROOT)}: {path}")
    assert not missing, missing
