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


def test_a_tav_is_not_its_own_competitor(tmp_path: Path) -> None:
    """Read from a process table of the test's own: what else this machine runs (a user's tune) is not asked."""
    from tavcli.cores import other_tav_running

    def process(pid: int, *argv: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")

    process(os.getpid(), "tav", "edit", "a dog")  # this process, named tav as the `tav` script's Python is
    process(os.getppid(), "/usr/bin/python3", "/venv/bin/tav", "tune")  # and the one it runs under
    process(4_000_001, "/usr/bin/python3", "-c", "print('tav')")
    process(4_000_002, "bash", "-c", "tav tune clip.mp4 'a man'")  # a shell starting one is not one yet
    assert not other_tav_running(tmp_path)
    process(4_000_003, "/usr/bin/python3.11", "-m", "tavcli", "tune")
    assert other_tav_running(tmp_path)
    (tmp_path / "4000003" / "cmdline").unlink()  # a process that ended while being read
    process(4_000_004, "/venv/bin/tav", "batch", "jobs.toml")
    assert other_tav_running(tmp_path)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads the Linux run queue")
def test_any_thread_setting_is_read() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TAV_WAIT_POLICY")}
    for threads in ("4,2", "abc", "0", ""):
        assert _policy({**env, "OMP_NUM_THREADS": threads}) in ("None", "PASSIVE")
