"""An interrupted preview tune: its kept states are reported and kept, but never become the current tune."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import CLIP, RunTav

SMALL = ["--model", "tiny", "--frames", "4", "--width", "64", "--height", "64"]


@pytest.mark.slow
def test_an_interrupted_preview_tune_leaves_no_current_tune(tmp_path: Path, run_tav: RunTav) -> None:
    project = tmp_path / "p.tav"
    preview = ["--preview", "a panda is skiing", "--preview-every", "2", "--preview-steps", "1"]
    command = [sys.executable, "-m", "tavcli", "tune", str(CLIP), "a man is skiing", *SMALL, "--steps", "300"]
    process = subprocess.Popen(
        [*command, *preview, "-p", str(project)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while not list(project.glob("renders/*.json")):  # the first kept state is stored and previewed
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no preview appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert " of 300" in err, err  # the tune's own --steps, not the next kept state's
    records = [json.loads(line) for line in out.splitlines()]
    kept = [r for r in records if r["kind"] == "tune"]
    assert kept and all(r["kept"] for r in kept) and kept[0]["steps"] == 2, out
    assert any(r["kind"] == "edit" and r["step"] == 2 for r in records), out  # the first preview was reported
    state = project / "project.json"  # written when a tune first becomes current
    assert not state.exists() or json.loads(state.read_text()).get("tune") is None

    code, out, err = run_tav("edit", "a dog", "-p", project, "--steps", "1")
    assert code == 1 and out == "" and "does not say which of the project's 1 tune to use" in err, err
    assert "when `tav tune` finishes it" in err
    assert (project / "tunes" / kept[0]["key"] / "meta.json").is_file()  # kept for the resumed run
