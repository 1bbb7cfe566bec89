"""`tav ui` in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright against the app served
on 127.0.0.1, as a user would go: upload the bundled clip, tune the tiny model, stop and resume, see the loss
curve, edit with two prompts and watch both play, remove an entry; every request the page made stays on this
machine. With TAV_UI_SCREENSHOTS=FOLDER the screenshots land there (docs/images holds the ones the docs show).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tavcli.ui.serve import launch
from tavcli.ui.studio import Studio
from tests.conftest import CLIP

CHROMIUM = os.environ.get("TAV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):  # CI installs it: there a missing browser fails
    pytest.skip("no chromium to drive (apt-get install chromium)", allow_module_level=True)
# As the sandboxed machine needs it: no sandbox as root, no GPU, none of Chromium's own calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Studio]]:
    folder = tmp_path_factory.mktemp("ui-browser")
    studio = Studio([], folder / "uploads", 50_000_000)
    page = launch(studio, "127.0.0.1", None, None)
    yield str(page.local_url), studio
    studio.queue.close()
    page.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _shot(page: Any, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("TAV_UI_SCREENSHOTS") or tmp_path)
    page.screenshot(path=str(folder / f"ui-{name}.png"), full_page=True)


def _until(page: Any, selector: str, pattern: str, seconds: float = 240) -> str:
    """The text of `selector` once it matches `pattern` (the page polls its jobs every second)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return str(text)
        if re.search(r"failed", text):
            raise AssertionError(text)
        page.wait_for_timeout(200)
    raise AssertionError(f"{selector} never matched {pattern!r}: {page.locator(selector).inner_text()!r}")


def test_a_user_tunes_stops_resumes_edits_and_cleans_up(
    served: tuple[str, Studio], browser: Any, tmp_path: Path
) -> None:
    url, studio = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    started = time.monotonic()
    page.goto(url)
    page.wait_for_selector("#project")
    print(f"page up in {time.monotonic() - started:.2f} s")

    # The bundled clip, uploaded: a project for it, and its frames with the tuned ones marked.
    page.get_by_role("tab", name="Project").click()
    page.locator("input[type=file]").set_input_files(str(CLIP))
    _until(page, "#status", r"project .*\.tav")
    page.get_by_role("tab", name="Tune").click()
    page.locator("#tune-prompt textarea").fill("a man is skiing")
    page.locator("#tune-model textarea").fill("tiny")
    for name, value in {"frames": 4, "width": 64, "height": 64, "steps": 40}.items():
        page.locator(f"#tune-{name} input").fill(str(value))
    page.locator("#tune-frames input").press("Tab")

    # A bad value is the command line's one line, and nothing is queued.
    page.locator("#tune-stride input").fill("0")
    page.locator("#tune").click()
    assert "--stride must be an integer of at least 1, not 0" in _until(page, "#status", r"error")
    page.locator("#tune-stride input").fill("2")

    # Tune, Stop after a few steps (the state is kept), Tune again: it resumes there and finishes.
    page.locator("#tune").click()
    _until(page, "#tune-progress", r"tuning ([3-9]|\d\d) of 40")
    page.locator("#stop").click()
    stopped = _until(page, "#tune-progress", r"stopped")
    step = int(re.search(r"interrupted at step (\d+) of 40", stopped).group(1))  # type: ignore[union-attr]
    page.locator("#tune").click()
    assert f"resuming from step {step}" in _until(page, "#tune-progress", rf"resuming from step {step}")
    page.reload()  # the tune runs in the server: the reopened page shows the project and where the tune is
    page.wait_for_selector("#project")
    page.get_by_role("tab", name="Tune").click()
    _until(page, "#tune-progress", r"tuning \d+ of 40|done")
    assert page.locator("#tune-prompt textarea").input_value() == "a man is skiing"
    _until(page, "#tune-progress", r"done")
    page.wait_for_selector("#loss img")
    _shot(page, "tune", tmp_path)

    # Two prompts: the grid and both edits load and play in the browser.
    page.get_by_role("tab", name="Edit").click()
    page.locator("#prompts textarea").fill("a panda is skiing\na man is skiing at sunset")
    page.locator("#edit-steps input").fill("10")
    clicked = time.monotonic()
    page.locator("#edit").click()
    page.wait_for_function("document.querySelectorAll('#results video').length === 3", timeout=240_000)
    page.wait_for_function(
        "[...document.querySelectorAll('#results video')].every(v => v.duration > 0 && v.currentTime > 0)",
        timeout=30_000,
    )
    print(f"Edit to playing videos in {time.monotonic() - clicked:.2f} s")
    # They play in step: pausing one pauses the others, playing one plays them all.
    page.locator("#results video").nth(1).evaluate("video => video.pause()")
    page.wait_for_function("[...document.querySelectorAll('#results video')].every(v => v.paused)", timeout=5_000)
    page.locator("#results video").nth(2).evaluate("video => video.play()")
    page.wait_for_function("[...document.querySelectorAll('#results video')].every(v => !v.paused)", timeout=5_000)
    commands = page.locator("#results .tav-command").all_inner_texts()
    assert len(commands) == 2 and all(c.startswith("tav edit ") for c in commands)
    _shot(page, "edit", tmp_path)

    # The Library: an edit removed, with `tav rm`'s rules.
    page.get_by_role("tab", name="Library").click()
    project = studio.chosen
    assert project is not None
    from tavcli.store.project import Project

    edit_key = Project(project).complete_keys("edits")[0]
    page.locator("#key textarea").fill(edit_key[:8])
    page.locator("#remove").click()
    assert f"removed edits/{edit_key[:8]}" in _until(page, "#library-note", "removed")
    assert edit_key not in Project(project).complete_keys("edits")
    _shot(page, "library", tmp_path)

    hosts = {urlsplit(request).hostname for request in requests}
    print(f"{len(requests)} requests, to {sorted(h or '' for h in hosts)}")
    for path in sorted({urlsplit(r).path.split("=")[0] for r in requests}):
        print("  ", path)
    assert hosts == {"127.0.0.1"}
    page.close()


def test_the_server_hands_out_no_file_outside_its_folders(served: tuple[str, Studio], tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    url, studio = served
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    inside = Path(studio.roots[0]) / "link-out.txt"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.symlink_to(secret)
    outside = [secret, inside, Path(studio.roots[0]) / ".." / ".." / secret.name, Path("/etc/passwd")]
    for path in [*outside, "https://1.1.1.1/x.png", "http://127.0.0.1:9/x"]:  # addresses: never fetched
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}") as answer:
                body = answer.read()
        except urllib.error.HTTPError as refused:
            assert refused.code in (403, 404), path
            continue
        raise AssertionError(f"{path} was served: {body[:40]!r}")
    inside.unlink()


def test_an_upload_over_the_limit_is_refused_before_it_is_stored(served: tuple[str, Studio]) -> None:
    import httpx

    url, studio = served
    big = b"\0" * (studio.upload_limit + 1)
    answer = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.mp4", big, "video/mp4")}, timeout=60)
    assert answer.status_code == 413, answer.text[:200]


def test_tav_ui_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tavcli", "ui", "--port", str(port), "--uploads", str(tmp_path / "up")]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        said = server.stderr.readline()  # `serving ... at URL`, once the server answers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            assert answer.status == 200
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    finally:
        server.kill()
    err = said + err
    assert server.returncode == 0, err
    assert f"at http://127.0.0.1:{port}/" in err and "stopping" in err
