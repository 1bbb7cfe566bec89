"""What the app knows and does, without the page: its projects and upload folder (the only places it serves
files from), clips taken in, and tune and edit jobs queued on the workflow's functions, as `tav tune` and
`tav edit` call them. Torch loads in the worker, on the first job."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path
from tavcli.files.hashing import file_sha256
from tavcli.progress import Reporter
from tavcli.settings.config import project_for_clip, resolve_settings
from tavcli.settings.inputs import require_regular_file
from tavcli.store.housekeeping import listing
from tavcli.store.project import Project
from tavcli.ui.forms import EditForm, TuneForm, edit_request, tune_request
from tavcli.ui.jobs import Job, JobQueue
from tavcli.ui.library import open_project
from tavcli.ui.safety import served

if TYPE_CHECKING:
    from tavcli.workflow.session import Session

__all__ = ["Studio", "make_session", "project_summary"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".gif")


def make_session(reporter: Reporter) -> Session:
    """The worker's session on the configured device and precision (`tav config`): this imports torch."""
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.session import Session

    chosen = resolve_settings({}, None)
    runtime = resolve_runtime(chosen["device"].value or "auto", chosen["precision"].value or "auto")
    return Session(runtime, reporter, allow_pickle=False)


class Studio:
    """The app's projects, its upload folder and its job queue. `roots` is the list of folders the server may
    serve files from: the web server reads the very list, so a project opened later is served too."""

    def __init__(
        self,
        projects: list[Path],
        uploads: Path,
        upload_limit: int,
        make: Callable[[Reporter], Session] = make_session,
    ) -> None:
        self.uploads = uploads.absolute()
        self.upload_limit = upload_limit
        self.projects: list[Path] = []
        self.chosen: Path | None = None  # the project last added or chosen: a reloaded page shows it
        self.roots: list[str] = [str(self.uploads)]
        self.queue = JobQueue(make)
        for project in projects:
            self.add(project)

    def add(self, project: Path) -> Path:
        """Serve `project` from now on and offer it in the project list; its absolute path."""
        root = Path(os.path.abspath(project.expanduser()))
        if root not in self.projects:
            self.projects.append(root)
            self.roots.append(str(root))
        self.chosen = root
        return root

    def open(self, given: str) -> Path:
        """An existing project by its path; refused in one line when there is none there."""
        if not given.strip():
            raise TavError("give the path of a project folder (NAME.tav)")
        return self.add(open_project(Path(given.strip()).expanduser()).root)

    def take_clip(self, given: Path, uploaded: bool) -> tuple[Path, Path]:
        """A clip (checked as `tav tune` checks its clip) and the project it gets: an upload is copied into the
        upload folder first, named by its content, so the same clip uploaded twice is one project."""
        from tavcli.media.video import probe

        require_regular_file(given, "video file")
        if given.suffix.lower() not in VIDEO_SUFFIXES:
            raise TavError(f"{given.name} is no clip tav reads", f"give one of {', '.join(VIDEO_SUFFIXES)}")
        if uploaded:
            size = given.stat().st_size
            if size > self.upload_limit:
                raise TavError(f"the upload is {size / 1e6:.0f} MB, over the limit of {self.upload_limit / 1e6:.0f} MB")
        clip = Path(os.path.abspath(given))
        try:
            probe(clip)  # before an upload is kept: nothing is kept of a clip that is refused
        except TavError as error:
            if not uploaded:
                raise
            raise TavError(error.message.replace(str(clip), given.name), error.hint) from None  # as the user named it
        if uploaded:
            clip = self._keep_upload(clip)
        project = project_for_clip(None, resolve_settings({}, None))(clip)
        if project.is_dir() and any(project.iterdir()) and not Project(project).recognised:
            raise TavError(f"{project} is a folder, but no tav project", "set --project or TAV_PROJECT elsewhere")
        return clip, self.add(project)

    def _keep_upload(self, upload: Path) -> Path:
        digest = file_sha256(upload)[:8]
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in upload.stem).strip("-") or "clip"
        kept = self.uploads / f"{stem}-{digest}{upload.suffix.lower()}"
        if not kept.is_file():
            self.uploads.mkdir(parents=True, exist_ok=True)
            with atomic_path(kept) as temp:
                shutil.copyfile(upload, temp)
        return kept

    def submit_tune(self, form: TuneForm) -> Job:
        """Check the form as `tav tune` checks its flags (and the clip's length), then queue the tune."""
        from tavcli.media.video import probe

        self._require_served(form.project)
        waiting = self.current(form.project, "tune")
        if waiting is not None and not waiting.finished:
            raise TavError(f"{waiting.title} is {waiting.state} on this project", "Stop it, or wait for it to end")
        request, preview, given = tune_request(form)
        probe(request.clip, request.selection if "frames" in given else None)

        def work(session: Session) -> list[Any]:
            from tavcli.workflow.tune_planning import with_model_defaults
            from tavcli.workflow.tuning import tune

            return tune(session, with_model_defaults(session, request, given=given), preview=preview)

        return self.queue.submit("tune", f"tune {request.prompt!r}", str(form.project), work)

    def submit_edit(self, form: EditForm) -> Job:
        """Check the form as `tav edit` checks its flags, then queue the edits and their side-by-side grid."""
        from tavcli.workflow.source_prompt import check_source_words

        self._require_served(form.project)
        open_project(form.project)  # edits need a tuned project: refused now, not when the job starts
        request = edit_request(form)
        check_source_words(request)

        def work(session: Session) -> list[Any]:
            from tavcli.workflow.editing import edit
            from tavcli.workflow.rendering import render_grid

            made = edit(session, request)
            return [*made, render_grid(session, request.project, made)]

        title = f"edit {', '.join(map(repr, request.prompts))}"
        return self.queue.submit("edit", title, str(form.project), work)

    def current(self, project: Path, kind: str) -> Job | None:
        """The job of `kind` on `project` the page shows (after a reload too) and Stop stops: the running one,
        else the next queued, else the newest."""
        jobs = [job for job in self.queue.jobs() if job.kind == kind and job.project == str(project)]
        for state in ("running", "queued"):
            found = [job for job in jobs if job.state == state]
            if found:
                return found[-1]  # jobs are newest first: the first asked
        return jobs[0] if jobs else None

    def _require_served(self, project: Path) -> None:
        if not served(project, self.projects) and not served(project, [self.uploads]):
            raise TavError(f"{project} is not one of the app's projects", "open or create it first")


def project_summary(root: Path) -> dict[str, Any]:
    """What the project's newest tune was made from, to fill the Tune tab: the clip, prompt, model, frames, size,
    seed, and steps ({} for a project never tuned). A training run stopped since the current tune was made
    (Stop, Ctrl-C) is the newer one: Tune with its settings resumes it (its steps are not recorded)."""
    project = open_project(root)
    runs = [row for row in listing(project) if row.kind == "checkpoints" and "latents" in row.spec and row.created]
    key = project.state.get("tune")
    tune = project.find("tunes", str(key)) if key else None
    stopped = max(runs, key=lambda row: str(row.created), default=None)
    if stopped is not None and (tune is None or str(stopped.created) > str(tune.meta().get("created", ""))):
        spec, steps = stopped.spec, None
    elif tune is not None:
        spec, steps = dict(tune.spec), tune.spec["steps"]
    else:
        return {}
    latents = project.find("latents", spec["latents"])
    return {
        "clip": latents.meta()["clip"]["path"],
        "prompt": spec["prompt"],
        "model": latents.spec["model"]["model"],
        **latents.spec["selection"],
        **{name: latents.spec["size"][name] for name in ("width", "height")},
        "seed": spec["seed"],
        **({"steps": steps} if steps else {}),
    }
