"""Serving the page: Gradio told to stay on this machine's own resources (no analytics, no update check, no
share link, no server-side rendering process, fonts from the system), to serve only the studio's folders, and
to stop the running job cleanly on Ctrl-C (a tune saves its state first)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tavcli.errors import Interrupted
from tavcli.ui.studio import Studio

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["OFFLINE_ENVIRONMENT", "default_uploads", "launch", "serve"]

# Read by Gradio and the Hugging Face libraries when they are imported: nothing is sent anywhere.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
    "GRADIO_SSR_MODE": "False",
}


def launch(studio: Studio, host: str, port: int | None, auth: tuple[str, str] | None) -> gr.Blocks:
    """Start serving `studio` in the background (`port` None: the first free one from 7860); the page, whose
    `local_url` is its address and whose `close()` stops serving."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    import gradio as gr

    from tavcli.ui.app import CSS, HEAD, build

    page = build(studio)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
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
        theme=theme,
        css=CSS,
        head=HEAD,
    )
    page.allowed_paths = studio.roots  # the very list: a project opened later is served too
    return page


def serve(studio: Studio, host: str, port: int, auth: tuple[str, str] | None, say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop the running job at its next safe point and wait for it."""
    page = launch(studio, host, port, auth)
    url = page.local_url
    say(f"serving {', '.join(map(str, studio.projects)) or 'no project yet'} at {url}")
    say("Ctrl-C stops (a running tune saves its state first)")
    try:
        while True:
            time.sleep(0.5)
    except (KeyboardInterrupt, Interrupted):
        say("stopping: the running job ends at its next safe point")
    finally:
        studio.queue.close()
        page.close()


def default_uploads() -> Path:
    """Where uploaded clips are kept (and, unless configured otherwise, their projects made)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("tav")) / "uploads"
