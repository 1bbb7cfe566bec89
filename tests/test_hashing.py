"""Content hashes are of the content: a file rewritten in place (same size, mtime and inode) is hashed
again, and a LoRA has one identity whether it is given as its file or as its folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tavcli.files import hashing
from tavcli.models.resolving import resolve_model
from tavcli.workflow.keys import lora_identity

from .conftest import CLIP, RunTav, edit_record


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes of the same length into the same inode, with the old access and modification times put back."""
    before = path.stat()
    assert len(data) == before.st_size
    with path.open("r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.fixture
def memo_everything(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Remember the hash of every file, however small or new (as for an old multi-GB checkpoint); list each
    file actually read."""
    read: list[Path] = []
    hash_file = hashing.file_sha256

    def counted(path: Path) -> str:
        read.append(path)
        return hash_file(path)

    monkeypatch.setattr(hashing, "MEMO_MIN_BYTES", 0, raising=False)
    monkeypatch.setattr(hashing, "SETTLED_NS", 0, raising=False)
    monkeypatch.setattr(hashing, "file_sha256", counted)
    return read


def test_the_memo_skips_an_unchanged_file_and_never_a_rewritten_one(
    tmp_path: Path, memo_everything: list[Path]
) -> None:
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = hashing.content_sha256(weights)
    assert hashing.content_sha256(weights) == first and memo_everything == [weights]  # remembered
    time.sleep(0.05)  # past the clock tick of the first write, as any later edit of the file is
    _rewrite_in_place(weights, b"b" * 4096)
    assert hashing.content_sha256(weights) == hashing.file_sha256(weights) != first


def test_a_file_changed_just_after_it_was_hashed_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within SETTLED_NS of its last change a file may change again within the same timestamp tick."""
    monkeypatch.setattr(hashing, "MEMO_MIN_BYTES", 0, raising=False)
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = hashing.content_sha256(weights)
    _rewrite_in_place(weights, b"b" * 4096)  # at once: its change time may not even have moved
    assert hashing.content_sha256(weights) != first


def test_a_lora_folder_rewritten_in_place_gets_a_new_identity(tmp_path: Path, memo_everything: list[Path]) -> None:
    folder = tmp_path / "style"
    folder.mkdir()
    weights = folder / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"a" * 4096)
    before = lora_identity(((folder, 1.0),))
    time.sleep(0.05)
    _rewrite_in_place(weights, b"b" * 4096)
    assert lora_identity(((folder, 1.0),)) != before


def test_a_lora_is_one_identity_as_its_file_or_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "style"
    folder.mkdir()
    weights = folder / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"a" * 4096)
    (folder / "README.md").write_text("a style LoRA\n")  # what a hub download holds beside the weights
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert lora_identity(((folder, 0.5),)) == lora_identity(((weights, 0.5),))
    assert resolve_model(f"tiny|lora={folder}:0.5").revision == resolve_model(f"tiny|lora={weights}:0.5").revision
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, moved)
    assert lora_identity(((moved, 0.5),)) == lora_identity(((weights, 0.5),))  # its bytes, not its name


def test_a_tune_time_lora_rewritten_in_place_is_another_model(tmp_path: Path, memo_everything: list[Path]) -> None:
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"a" * 4096)
    before = resolve_model(f"tiny|lora={weights}:1.0").revision
    time.sleep(0.05)
    _rewrite_in_place(weights, b"b" * 4096)
    assert resolve_model(f"tiny|lora={weights}:1.0").revision != before


@pytest.mark.slow
def test_an_edit_with_a_lora_folder_rewritten_in_place_is_not_the_cached_one(
    tiny_query_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    project = tmp_path / "p.tav"
    small = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
    assert run_tav("tune", CLIP, "a man is skiing", *small, "-p", project)[0] == 0
    folder = tmp_path / "style"
    shutil.copytree(tiny_query_lora, folder)
    first = edit_record(run_tav, project, "--lora", folder)
    weights = folder / "pytorch_lora_weights.safetensors"
    time.sleep(0.05)
    _rewrite_in_place(weights, _doubled_weights(weights.read_bytes()))
    again = edit_record(run_tav, project, "--lora", folder)
    assert again["key"] != first["key"] and again["cached"] is False
    as_file = edit_record(run_tav, project, "--lora", weights)  # the same LoRA given as its file
    assert as_file["key"] == again["key"] and as_file["cached"] is True
    spec = json.loads((project / "edits" / again["key"] / "meta.json").read_text())["spec"]
    assert spec["loras"] == [{"sha256": hashing.file_sha256(weights), "scale": 1.0}]


def _doubled_weights(payload: bytes) -> bytes:
    """A float32 safetensors file with every value doubled: the same header, the same size."""
    import numpy as np

    start = 8 + int.from_bytes(payload[:8], "little")
    values = np.frombuffer(payload[start:], dtype="<f4") * 2
    return payload[:start] + values.astype("<f4").tobytes()


def test_a_lora_folder_without_weights_is_one_line(tmp_path: Path) -> None:
    from tavcli.errors import TavError

    folder = tmp_path / "empty-lora"
    folder.mkdir()
    (folder / "README.md").write_text("weights elsewhere\n")
    with pytest.raises(TavError, match=r"the LoRA folder .*empty-lora holds no weights file \(.safetensors or .bin\)"):
        lora_identity(((folder, 1.0),))
