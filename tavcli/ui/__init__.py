"""`tav ui`: the project store in a local web app (Gradio), a second front end beside the command line.

- `safety`: what is refused before serving (another host without --auth, share links, files outside);
- `forms`: the page's fields as `tav tune` and `tav edit` requests, with their checks;
- `jobs`: the queue, one worker thread per device, and what each job shows;
- `studio`: the app's projects, uploads and job submission on the workflow's functions;
- `library`: `tav ls`, `tav rm`, `tav verify` and `tav gc` for the Library tab;
- `views`: a job's progress, loss curve and results as the page shows them;
- `handlers` and `app`: the page itself (Gradio), `serve`: serving it.
"""
