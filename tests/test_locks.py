"""The lock protocol (`tavcli.store.locks`): this process's use locks are counted per path and released by
the last hold; the project's delegations lock the same files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tavcli.store.locks import UseRegistry, busy, in_use, use_path, users
from tavcli.store.project import Project


def test_a_use_lock_taken_twice_is_counted_and_released_at_the_last_release(tmp_path: Path) -> None:
    registry = UseRegistry()
    path = use_path(tmp_path, "tunes", "0" * 16, os.getpid())
    path.parent.mkdir(parents=True)
    assert registry.hold(path) and registry.hold(path)
    assert registry.holds(path) == 2 and registry.held[path].holds == 2
    registry.release(path)
    assert registry.holds(path) == 1 and path.exists() and busy(tmp_path, path.stem)  # still locked
    registry.release(path)
    assert registry.holds(path) == 0 and path not in registry.held
    assert not path.exists()  # the last release deletes the file
    assert not busy(tmp_path, path.stem)


def test_nested_using_blocks_hold_an_entry_until_the_outer_one_ends(tmp_path: Path) -> None:
    project = Project(tmp_path / "p.tav")
    tune = project.entry("tunes", {"latents": "0" * 16, "prompt": "a man", "steps": 1})
    tune.save({"w": torch.ones(1)}, {})
    with project.using([tune], "this edit"):
        with project.using([tune], "this tune"):
            assert users(project.root, "tunes", tune.key) == [os.getpid()]
        assert users(project.root, "tunes", tune.key) == [os.getpid()]  # the outer block still holds it
        assert in_use(project.root, "tunes", tune.key) == f"is in use by a running tav command (process {os.getpid()})"
    assert users(project.root, "tunes", tune.key) == []
    assert in_use(project.root, "tunes", tune.key) is None
    assert not use_path(project.root, "tunes", tune.key, os.getpid()).exists()


def test_the_projects_lock_is_the_protocols_lock_file(tmp_path: Path) -> None:
    project = Project(tmp_path / "p.tav")
    with project.lock("tunes-x") as held:
        assert held and (project.root / ".locks" / "tunes-x.lock").exists()
        assert busy(project.root, "tunes-x") and project.busy("tunes-x")
        with project.lock("tunes-x", wait=False) as again:
            assert not again  # busy: not waited for
    assert not project.busy("tunes-x")
