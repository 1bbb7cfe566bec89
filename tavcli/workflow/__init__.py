"""What `tav tune`, `tav invert` and `tav edit` do, as plain functions on a project directory.

Each step looks its result up in the project's store first and computes it only when missing. One
module per concern:

- `session`: the models loaded in this process (`Session`), the project and tune a command works
  on, prompt embeddings, and the `Artifact` records commands print;
- `keys`: what each store entry's key is made of, and how `tav ls` describes it (torch-free);
- `tuning`: `tune`; `tune_planning`: `tune_plan`, `tune_entry` (what a tune request resolves to, computing
  nothing); `importing`: `import_tune`;
- `planning`: what an edit or inversion needs from the store, from keys alone (batch's dry run lists it);
- `inversion`: `invert`, `invert_for_edits` (`tav invert`);
- `editing`: `plan_edit`, `edit`, `edit_from_sidecar`; `plans`: the `EditPlan` they pass on;
- `null_text`: `fit_null_text`, null-text embeddings in the store;
- `rendering`: an edit's output (name, rate, reuse), grids and scores; `records`: what their sidecars say;
- `remedies`: what to try when a result is not finite, worded as flags.

`from tavcli.workflow import edit` works as before; names are imported on first use, so that
`tavcli.workflow.keys` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Where the names below live, torch-free modules (requests, keys) first; each name is imported on first use
# (code inside tavcli imports the modules themselves).
MODULES = (
    "tavcli.settings.tuning",
    "tavcli.settings.sampling",
    "tavcli.settings.editing",
    "tavcli.workflow.keys",
    "tavcli.workflow.plans",
    "tavcli.workflow.session",
    "tavcli.workflow.tune_planning",
    "tavcli.workflow.tuning",
    "tavcli.workflow.importing",
    "tavcli.workflow.planning",
    "tavcli.workflow.null_text",
    "tavcli.workflow.inversion",
    "tavcli.workflow.editing",
    "tavcli.workflow.rendering",
)
__all__ = [
    "Artifact",
    "EditPlan",
    "EditRequest",
    "EditSettings",
    "Session",
    "TuneRequest",
    "TuneSettings",
    "command_inversion",
    "control_key",
    "describe",
    "edit",
    "edit_entries",
    "edit_needs",
    "edit_spec",
    "edit_from_sidecar",
    "fit_null_text",
    "import_tune",
    "inversion_entry",
    "inversion_needed",
    "invert",
    "invert_for_edits",
    "invert_needs",
    "kept_steps",
    "kept_tune",
    "latents_entry",
    "null_text_entry",
    "null_text_needed",
    "plan_edit",
    "run_plan",
    "prompt_embeddings",
    "render_grid",
    "tune",
    "tune_entry",
    "tune_plan",
    "tune_run",
    "with_model_defaults",
    "tune_spec",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        for path in MODULES:
            module = importlib.import_module(path)
            if name in module.__all__:
                value = globals()[name] = getattr(module, name)  # found once
                return value
    raise AttributeError(f"module 'tavcli.workflow' has no attribute {name!r}")
