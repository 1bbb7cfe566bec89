"""What the page shows of a job, as text, pictures and HTML: its progress (steps, ETA, loss), its loss curve, its
results side by side with their downloads and the `tav edit` command that makes each again. Gradio-free."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from tavcli.errors import TavError
from tavcli.media.plots import loss_curve
from tavcli.store.sidecar import read_sidecar, sidecar_of
from tavcli.ui.jobs import Job, JobQueue

__all__ = [
    "FILE_ROUTE",
    "file_url",
    "jobs_table",
    "loss_picture",
    "plain",
    "progress_text",
    "results_html",
    "tune_previews",
]

FILE_ROUTE = "/gradio_api/file="  # where the server hands out files under its allowed folders


def file_url(path: Path) -> str:
    """The page's address of a file the server may serve (one under the app's projects or uploads)."""
    return FILE_ROUTE + quote(str(path.absolute()))


def plain(text: str) -> str:
    """`text` shown as it is in a Markdown line: a prompt's `![x](https://...)` or `<img>` is text, not a
    picture fetched from another machine."""
    return re.sub(r"([\\`*_\[\]<>!&~|])", r"\\\1", text)  # what makes markup inside a line


def progress_text(job: Job | None, queue: JobQueue) -> str:
    """One or two lines: queued (and its place), the task with its steps, ETA and last loss, or how it ended."""
    if job is None:
        return ""
    head = f"**{plain(job.title)}**: "
    if job.state == "queued":
        place = queue.place(job)
        return head + (f"queued, {_ordinal(place)} in line" if place else "queued")
    if job.state == "running":
        task = job.task
        if task is None:
            return head + "loading the model"
        if job.notes:  # `resuming from step 40`, a rounded size: what the terminal would print
            head = f"{head}{plain(job.notes[-1])}; "
        eta = task.eta_seconds(time.monotonic())
        parts = [f"{task.description} {task.completed} of {task.total}"]
        parts += [] if eta is None else [f"about {_duration(eta)} left"]
        parts += [f"loss {job.losses[-1]:.4f}"] if job.losses and task.description == "tuning" else []
        return head + ", ".join(parts)
    seconds = f" in {_duration(job.seconds)}" if job.seconds is not None else ""
    if job.state == "done":
        return head + f"done{seconds}"
    ended = "stopped" if job.state == "stopped" else "failed"
    return head + f"{ended}{seconds}: {plain(job.error or '')}"


def loss_picture(job: Job | None) -> Image.Image | None:
    """The tune's loss per step so far (None before the first step); once it is done, the tune's own loss curve,
    every step of it (a resumed run's steps before the stop included)."""
    if job is None:
        return None
    tuned = [made for made in job.made if made.kind == "tune" and "loss_plot" in made.details]
    if job.state == "done" and tuned:
        with Image.open(tuned[-1].details["loss_plot"]) as picture:
            return picture.convert("RGB")
    if not job.losses:
        return None
    return loss_curve(list(job.losses), title=f"{job.title}, {len(job.losses)} steps this run")


def tune_previews(job: Job | None) -> list[str]:
    """The preview edits a tune rendered at its kept steps, and the sheet of them all, as files to show."""
    if job is None:
        return []
    shown = [str(made.path) for made in job.made if made.kind == "edit"]
    sheet = next((made for made in job.made if made.kind == "preview"), None)
    return shown + ([str(sheet.path)] if sheet is not None else [])


def results_html(job: Job | None) -> str:
    """An edit job's results: the source beside every edit in one video, then each edit on its own (they play
    in step), with the grid, the GIF and the mp4s to download and each edit's `tav edit` command."""
    if job is None or job.state != "done":
        return ""
    edits = [made for made in job.made if made.kind == "edit"]
    grid = next((made for made in job.made if made.kind == "grid"), None)
    parts = []
    if grid is not None:
        links = [_download(grid.path, "grid mp4"), _download(Path(grid.details["gif"]), "grid GIF")]
        links.append(_download(Path(grid.details["sheet"]), "contact sheet"))
        parts.append(
            f'<figure class="tav-grid">{_video(grid.path, "source and edits")}'
            f"<figcaption>source | {' | '.join(html.escape(p) for p in grid.details['prompts'])}"
            f"<br>{' · '.join(links)}</figcaption></figure>"
        )
    for made in edits:
        command = _command(made.path)
        parts.append(
            f'<figure class="tav-edit">{_video(made.path, made.details.get("prompt", ""))}'
            f"<figcaption>{html.escape(str(made.details.get('prompt', '')))}<br>{_download(made.path, 'mp4')}"
            f'<pre class="tav-command">{html.escape(command)}</pre></figcaption></figure>'
        )
    return f'<div class="tav-results">{"".join(parts)}</div>'


def jobs_table(queue: JobQueue) -> list[list[str]]:
    """Every job of this server's life, newest first: what, on which project, and where it stands."""
    rows = []
    for job in queue.jobs():
        state = job.state if job.state != "queued" else f"queued ({_ordinal(queue.place(job))})"
        rows.append([str(job.id), job.title, Path(job.project).name, state, job.error or ""])
    return rows


def _video(path: Path, label: str) -> str:
    return (
        f'<video class="tav-sync" src="{file_url(path)}" muted loop autoplay playsinline controls preload="auto" '
        f'aria-label="{html.escape(label)}"></video>'
    )


def _download(path: Path, label: str) -> str:
    return f'<a href="{file_url(path)}" download="{html.escape(path.name)}">{html.escape(label)}</a>'


def _command(output: Path) -> str:
    """The sidecar's `tav edit` command (the last it records), or '' when the sidecar is gone."""
    try:
        record: dict[str, Any] = read_sidecar(sidecar_of(output))
    except (TavError, OSError):  # a removed or damaged sidecar: the video still shows
        return ""
    commands = record.get("reproduce") or []
    return str(commands[-1]) if commands else ""


def _ordinal(place: int) -> str:
    return f"{place}{'th' if 10 <= place % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(place % 10, 'th')}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
