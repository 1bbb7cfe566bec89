"""The page: a project picker and the Project, Tune, Edit, Library and Jobs tabs, wired to the studio's handlers.
Each handler answers at once: work goes to the queue, and a one-second timer shows how it goes."""

from __future__ import annotations

import gradio as gr

from tavcli.settings.attention import REWEIGHT_MAX
from tavcli.settings.config import resolve_settings
from tavcli.settings.option import Option
from tavcli.settings.options import EDIT, INVERT, TUNE
from tavcli.ui import handlers
from tavcli.ui.studio import Studio

__all__ = ["CSS", "HEAD", "build"]

EDIT_NUMBERS = ("steps", "guidance", "seed")

# Edits play in step: playing, pausing or seeking one does the same to the others (media events do not bubble,
# so the page listens in the capture phase).
HEAD = """<script>
(() => {
  let busy = false;
  const others = (video) => [...document.querySelectorAll("video.tav-sync")].filter((v) => v !== video);
  const sync = (handler) => (event) => {
    const video = event.target;
    if (busy || !(video instanceof HTMLVideoElement) || !video.classList.contains("tav-sync")) return;
    busy = true;
    try { others(video).forEach((other) => handler(video, other)); } finally { busy = false; }
  };
  document.addEventListener("play", sync((v, o) => { o.currentTime = v.currentTime; o.play(); }), true);
  document.addEventListener("pause", sync((v, o) => o.pause()), true);
  document.addEventListener("seeked", sync((v, o) => { o.currentTime = v.currentTime; }), true);
})();
</script>"""
CSS = """
.tav-results { display: flex; flex-wrap: wrap; gap: 12px; }
.tav-results figure { margin: 0; }
.tav-results .tav-grid { flex-basis: 100%; }
.tav-results video { max-width: 100%; border-radius: 4px; background: #000; }
.tav-results .tav-edit video { height: 256px; }
.tav-results .tav-grid video { height: 272px; }
.tav-command { white-space: pre-wrap; word-break: break-all; font-size: 12px; max-width: 40em; }
"""


def _number(option: Option, label: str, tab: str) -> gr.Number:
    """A number field for `option`, with its range as help: a value outside it is refused as `tav` refuses it."""
    precision = 0 if option.kind is int else None
    elem_id = f"{tab}-{option.name.replace('_', '-')}"
    return gr.Number(value=option.default, label=label, info=option.describe(), precision=precision, elem_id=elem_id)


def build(studio: Studio) -> gr.Blocks:
    """The app's page over `studio`'s projects and queue."""
    first = str(studio.projects[0]) if studio.projects else None
    model = resolve_settings({}, None)["model"].value or "tiny"
    with gr.Blocks(title="tav", analytics_enabled=False) as page:
        gr.Markdown("# tav: Tune-A-Video\nTune a model on one clip and its description, then edit it with new prompts.")
        project = gr.Dropdown([str(p) for p in studio.projects], value=first, label="Project", elem_id="project")
        status = gr.Markdown(elem_id="status")
        with gr.Tabs():
            with gr.Tab("Project", id="project-tab"):
                open_path = gr.Textbox(label="Open a project folder", placeholder="/path/to/clip.tav")
                open_button = gr.Button("Open project")
                upload = gr.File(label="Or start from a clip: upload one", file_types=["video"], type="filepath")
                clip_path = gr.Textbox(label="... or give a clip's path on this machine")
                clip_button = gr.Button("Use this clip")
            with gr.Tab("Tune", id="tune-tab"):
                with gr.Row():
                    clip = gr.Textbox(label="Clip", interactive=False, scale=3)
                    prompt = gr.Textbox(
                        label="What the clip shows", placeholder="a man is skiing", scale=3, elem_id="tune-prompt"
                    )
                    model_box = gr.Textbox(
                        value=model, label="Model (hub id, folder, file or tiny)", scale=2, elem_id="tune-model"
                    )
                with gr.Row():
                    frames = [_number(TUNE[name], name, "tune") for name in handlers.TUNE_NUMBERS[:5]]
                with gr.Row():
                    steps, seed = (_number(TUNE[name], name, "tune") for name in ("steps", "seed"))
                    preview = gr.Textbox(
                        label="Preview prompt (rendered at kept steps)", placeholder="optional", elem_id="tune-preview"
                    )
                    preview_every = _number(TUNE["preview_every"], "preview every", "tune")
                strip = gr.Image(label="The clip's frames (red: the ones the tune takes)", interactive=False)
                with gr.Row():
                    tune_button = gr.Button("Tune", variant="primary", elem_id="tune")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                tune_progress = gr.Markdown(elem_id="tune-progress")
                loss = gr.Image(label="Loss", interactive=False, elem_id="loss")
                previews = gr.Gallery(label="Previews", columns=4, height="auto", visible=False)
            with gr.Tab("Edit", id="edit-tab"):
                prompts = gr.Textbox(label="Edit prompts, one per line", lines=3, elem_id="prompts")
                with gr.Row():
                    edit_fields = [_number(EDIT[name], name, "edit") for name in EDIT_NUMBERS]
                    negative = gr.Textbox(label="negative prompt")
                    inversion = gr.Dropdown(
                        list(INVERT["inversion"].allowed), value=INVERT["inversion"].default, label="inversion"
                    )
                with gr.Accordion("Attention control (Prompt-to-Prompt)", open=False):
                    with gr.Row():
                        cross = gr.Slider(0, 1, value=0, step=0.05, label="cross-replace (fraction of steps)")
                        self_replace = gr.Slider(0, 1, value=0, step=0.05, label="self-replace (fraction of steps)")
                    blend_source = gr.CheckboxGroup([], label="blend: words of the tuned prompt")
                    blend_edit = gr.CheckboxGroup([], label="blend: words of the edit prompts")
                    with gr.Row():
                        reweight = gr.CheckboxGroup([], label="reweight: words of the edit prompts", scale=3)
                        scale = gr.Slider(0, REWEIGHT_MAX, value=2, step=0.1, label="their weight", scale=1)
                loras = gr.Textbox(label="LoRAs for this edit (PATH or PATH:SCALE, one per line)", lines=1)
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                edit_progress = gr.Markdown(elem_id="edit-progress")
                results = gr.HTML(elem_id="results")
            with gr.Tab("Library", id="library-tab") as library_tab:
                table = gr.Dataframe(headers=handlers.LIBRARY_COLUMNS, interactive=False, elem_id="library")
                with gr.Row():
                    key = gr.Textbox(label="Entry key (a unique prefix is enough) or KIND/KEY", elem_id="key")
                    remove_button = gr.Button("Remove", variant="stop", elem_id="remove")
                    verify_button = gr.Button("Verify")
                    gc_button = gr.Button("Collect garbage")
                library_note = gr.Markdown(elem_id="library-note")
            with gr.Tab("Jobs", id="jobs-tab"):
                jobs = gr.Dataframe(headers=["job", "what", "project", "state", "error"], interactive=False)
        shown = gr.State({})
        timer = gr.Timer(1.0)

        tune_form = [project, clip, prompt, model_box, *frames, steps, seed, preview, preview_every]
        edit_form = [project, prompts, *edit_fields, negative, inversion, cross, self_replace]
        edit_form += [blend_source, blend_edit, reweight, scale, loras]
        filled = [status, clip, prompt, model_box, *frames, steps, seed, blend_source, table, shown]

        page.load(lambda: handlers.restore(studio), [], [project])
        project.change(lambda p: handlers.fill(studio, p), [project], filled)
        open_button.click(lambda p: handlers.open_project(studio, p), [open_path], [status, project])
        upload.upload(lambda f: handlers.take_clip(studio, f, True), [upload], [status, project, clip])
        clip_button.click(lambda f: handlers.take_clip(studio, f, False), [clip_path], [status, project, clip])
        strip_fields = [clip, *frames[:3]]
        triggers = [clip.change, *(field.change for field in frames[:3])]
        gr.on(triggers, handlers.frame_strip, strip_fields, [strip, status])
        tune_button.click(lambda *values: handlers.tune(studio, *values), tune_form, [status])
        stop_button.click(lambda p: handlers.stop(studio, p), [project], [status])
        prompts.change(handlers.offer_words, [prompts, blend_edit, reweight], [blend_edit, reweight])
        edit_button.click(lambda *values: handlers.edit(studio, *values), edit_form, [status])
        remove_button.click(lambda p, k: handlers.remove(studio, p, k), [project, key], [library_note, table])
        verify_button.click(lambda p: handlers.verify(studio, p), [project], [library_note, table])
        gc_button.click(lambda p: handlers.collect(studio, p), [project], [library_note, table])
        library_tab.select(lambda p: handlers.entries(studio, p), [project], [library_note, table])
        poll_out = [tune_progress, loss, previews, edit_progress, results, jobs, shown]
        timer.tick(lambda p, s: handlers.poll(studio, p, s), [project, shown], poll_out)
    built: gr.Blocks = page
    return built
