"""Serving the page: Gradio told to stay on this machine's own resources (no analytics, no update check, no
share link, no server-side rendering process, fonts from the system), to serve only the studio's folders, and
to stop the running job cleanly on Ctrl-C (a tune saves its state first)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tavcli.errors import Interrupted, TavError
from tavcli.ui.studio import Studio

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["OFFLINE_ENVIRONMENT", "NoRemoteFiles", "default_uploads", "launch", "serve"]

# Read by Gradio and the Hugging Face libraries when they are imported: nothing is sent anywhere.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
    "GRADIO_SSR_MODE": "False",
}


class NoRemoteFiles:
    """Refuses Gradio's file route for an address (`/gradio_api/file=https://...`): Gradio would fetch it from
    the internet on the request's behalf. The page only ever asks for local files."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        _, route, asked = str(scope.get("path", "")).partition("/file=")
        if scope["type"] == "http" and route and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", asked):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"only local files are served"})
            return
        await self.app(scope, receive, send)


def launch(studio: Studio, host: str, port: int | None, auth: tuple[str, str] | None) -> gr.Blocks:
    """Start serving `studio` in the background (`port` None: the first free one from 7860); the page, whose
    `local_url` is its address and whose `close()` stops serving."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    import gradio as gr
    from starlette.middleware import Middleware

    from tavcli.ui.app import CSS, HEAD, build

    page = build(studio)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            share=False,
            allowed_paths=studio.roots,
            max_file_size=studio.upload_limit,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            footer_links=[],
            prevent_thread_lock=True,
            quiet=True,
            theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
            css=CSS,
            head=HEAD,
            app_kwargs={"middleware": [Middleware(NoRemoteFiles)]},
        )
    except OSError as error:
        if "Cannot find empty port" in str(error):
            raise TavError(f"port {port} on {host} is in use", "choose another with --port") from None
        raise
    page.allowed_paths = studio.roots  # the very list: a project opened later is served too
    return page


def serve(studio: Studio, host: str, port: int, auth: tuple[str, str] | None, say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C or SIGTERM, then let the running job end (a tune after its current step, its state
    saved) and stop; a second Ctrl-C stops at once."""
    page = launch(studio, host, port, auth)
    say(f"serving {', '.join(map(str, studio.projects)) or 'no project yet'} at {page.local_url}")
    say("Ctrl-C stops (a running tune saves its state first)")
    try:
        while True:
            time.sleep(0.5)
    except (KeyboardInterrupt, Interrupted):
        say("stopping: the running job ends first (a tune after its current step); Ctrl-C again stops at once")
    try:
        studio.queue.close()
    except (KeyboardInterrupt, Interrupted):
        say("stopped at once: the running job's unsaved work is lost")
        os._exit(130)  # the worker is inside torch: an orderly exit would abort the process
    finally:
        page.close()


def default_uploads() -> Path:
    """Where uploaded clips are kept (and, unless configured otherwise, their projects made)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("tav")) / "uploads"
