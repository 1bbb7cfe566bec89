"""`tav ui`: the project store in a local web app."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from tavcli.cli import output
from tavcli.cli.options import QuietOpt
from tavcli.errors import TavError

__all__ = ["serve_app"]

UPLOAD_LIMIT_MB = 500
UPLOAD_MAX_MB = 1_000_000  # 1 TB: no clip is larger, and a larger limit overflows the web server's integers


def serve_app(
    projects: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="Projects to open (NAME.tav folders); more can be opened or made in the app.",
            metavar="PROJECT_DIR",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but this machine's needs --auth.", metavar="HOST")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535, metavar="PORT")] = 7860,
    auth: Annotated[
        Optional[str],
        typer.Option(
            help="Ask for this user name and password (needed with another --host).",
            metavar="USER:PASSWORD",
            show_default=False,
        ),
    ] = None,
    share: Annotated[
        bool, typer.Option("--share", help="Refused: a public link needs the internet and exposes this machine.")
    ] = False,
    uploads: Annotated[
        Optional[Path],
        typer.Option(
            help="Where uploaded clips are kept [default: the user data folder's tav/uploads].",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    max_upload: Annotated[
        int, typer.Option("--max-upload", help="Largest clip to accept, in MB.", min=1, max=UPLOAD_MAX_MB, metavar="MB")
    ] = UPLOAD_LIMIT_MB,
    quiet: QuietOpt = False,
) -> None:
    """Open the projects in a web app on this machine: tune, edit, compare and clean up in the browser.

    The app runs the same work as the commands on the same project store (a `tav edit` in a terminal
    and the app can share a project); jobs run one at a time, queued, and keep running when the page
    is closed. It needs the ui extra: pip install "tavcli[ui]".

    Examples:

      tav ui skiing.tav

      tav ui --host 0.0.0.0 --auth ana:correct-horse
    """
    from tavcli.settings.inputs import require_folder
    from tavcli.ui.safety import SHARE_REFUSED, credentials

    if share:
        raise TavError(*SHARE_REFUSED)
    login = credentials(host, auth)
    if importlib.util.find_spec("gradio") is None:
        raise TavError("tav ui needs Gradio, which is not installed", 'pip install "tavcli[ui]"')
    from tavcli.ui.library import open_project

    for project in projects or []:
        open_project(project)  # a folder that is no project is refused, never served
    from tavcli.ui.serve import default_uploads, serve
    from tavcli.ui.studio import Studio

    folder = require_folder(uploads or default_uploads(), "--uploads")
    studio = Studio(list(projects or []), folder, max_upload * 1_000_000)
    serve(studio, host, port, login, output.show)
