"""The machine around tav: an unreachable hub fails at once with one line, and a busy CPU gets OpenMP's
passive wait policy (chosen before torch loads)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import CLIP, RunTav


@pytest.fixture
def hub_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point huggingface_hub at an endpoint, online mode, with tav's answer forgotten before and after."""
    from huggingface_hub import constants

    from tavcli.models.hub import hub_reachable

    def point(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub_reachable.cache_clear()

    yield point
    hub_reachable.cache_clear()


def test_the_hub_is_asked_once_and_any_answer_counts(hub_at: Callable[[str], None]) -> None:
    from tavcli.models.hub import hub_reachable

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable()
    finally:
        server.shutdown()
        server.server_close()
    hub_at("http://127.0.0.1:9")  # the discard port: nothing listens, the connection is refused
    assert not hub_reachable()


def test_an_unreachable_hub_fails_at_once_with_one_line(
    tmp_path: Path, hub_at: Callable[[str], None], run_tav: RunTav
) -> None:
    hub_at("http://127.0.0.1:9")
    output = tmp_path / "clip.mp4"
    shutil.copy(CLIP, output)
    project = tmp_path / "p.tav"
    small = ["--model", "tiny", "--frames", "2", "--width", "32", "--height", "32", "--steps", "1"]
    assert run_tav("tune", CLIP, "a man", *small, "-p", project)[0] == 0
    cases: list[tuple[list[str | Path], str, str]] = [
        (["eval", output], "openai/clip-vit-large-patch14", "--clip-model"),
        (["tune", CLIP, "a man", "-m", "tavcli-test/missing", "-p", project], "tavcli-test/missing", "--model tiny"),
        (
            ["edit", "a dog", "-p", project, "--control", "canny", "--control-model", "tavcli-test/cn"],
            "tavcli-test/cn",
            "--control-model",
        ),
    ]
    for args, model, hint in cases:
        code, out, err = run_tav(*args)
        last = err.strip().splitlines()[-1]
        assert code == 1 and out == "" and "Traceback" not in err, err
        assert last.startswith(f"error: cannot load '{model}': the hub is unreachable") and hint in last, err
        assert "inverting" not in err  # every model of the command is found before any work


def _policy(env: dict[str, str]) -> str:
    code = "from tavcli.cores import choose_wait_policy; print(choose_wait_policy())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads the Linux run queue")
def test_passive_waiting_when_another_tav_runs_and_never_over_the_users_choice() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TAV_WAIT_POLICY")}
    other = subprocess.Popen(["bash", "-c", "exec -a tav sleep 30"])  # a process named like tav
    try:
        assert _policy(env) == "PASSIVE"
        assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "None"
        assert _policy({**env, "TAV_WAIT_POLICY": "off"}) == "None"
    finally:
        other.kill()
        other.wait()


def test_the_run_queue_is_read_and_torch_already_loaded_is_left_alone() -> None:
    import torch  # noqa: F401

    from tavcli.cores import choose_wait_policy, runnable_elsewhere

    others = runnable_elsewhere()
    assert others is None or others >= 0
    assert "torch" in sys.modules and choose_wait_policy() is None  # too late: libgomp read it already


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads the Linux run queue")
def test_a_tav_is_not_its_own_competitor_and_any_thread_setting_is_read() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TAV_WAIT_POLICY")}
    check = f"exec -a tav {sys.executable} -c 'from tavcli.cores import other_tav_running; print(other_tav_running())'"
    ask = ["bash", "-c", check]  # this process is named tav, as the `tav` script's Python is
    assert subprocess.run(ask, capture_output=True, text=True, env=env, check=True).stdout.strip() == "False"
    other = subprocess.Popen(["bash", "-c", "exec -a tav sleep 30"])
    try:
        assert subprocess.run(ask, capture_output=True, text=True, env=env, check=True).stdout.strip() == "True"
    finally:
        other.kill()
        other.wait()
    for threads in ("4,2", "abc", "0", ""):
        assert _policy({**env, "OMP_NUM_THREADS": threads}) in ("None", "PASSIVE")
