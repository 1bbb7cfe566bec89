"""How well each inversion gives the source clip back: prints one JSON object (docs/method.md, "Reconstruction").

    python benchmarks/reconstruction.py --config tiny    # the built-in tiny model, 8 frames at 128x128
    python benchmarks/reconstruction.py --config mid     # narrow SD 1.5 (random weights), 8 frames at 256x256

The bundled clip is tuned for `--tune-steps` steps through `tavcli.workflow`, then edited with its own
prompt from each inversion (plain DDIM with the empty prompt, DDIM with the source prompt,
negative-prompt, null-text with the paper's Adam budget and with `--fit`) at each guidance. For each: the
mean squared error of the edit's latents against the clip's clean latents (the VAE posterior mean, as
the UNet sees it), the PSNR of its decoded frames against the VAE's own reconstruction of the source
(the ceiling any edit can reach), the seconds per inversion step, the null-text fit's seconds, and the
seconds and new fits of a second edit at the same guidance (`second_edit_fits`: 0 when the fit is reused).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import build_model  # noqa: E402

from tavcli import workflow  # noqa: E402
from tavcli.method.vae import decode_latents  # noqa: E402
from tavcli.runtime import resolve_runtime  # noqa: E402
from tavcli.settings.editing import EditRequest  # noqa: E402
from tavcli.settings.sampling import EditSettings, InversionSettings  # noqa: E402
from tavcli.settings.tuning import FrameSelection, FrameSize, TuneRequest, TuneSettings  # noqa: E402
from tavcli.store.project import Project  # noqa: E402

SOURCE = "a man is skiing"
SIZES = {"tiny": 128, "mid": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(SIZES), default="tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of inversion and editing")
    parser.add_argument("--tune-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5, 12.5])
    parser.add_argument("--fit", type=float, nargs=2, default=[20, 0.1], metavar=("ITERATIONS", "LR"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(".tav-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = str(build_model(args.config, args.workdir / "models"))
    project = args.workdir / f"reconstruction-{args.config}-{time.time_ns()}.tav"
    session = workflow.Session(resolve_runtime("cpu", "fp32"))
    size = SIZES[args.config]
    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        tune = TuneRequest(
            clip=clip, prompt=SOURCE, project=project, model=model,
            selection=FrameSelection(frames=args.frames, stride=2), size=FrameSize(width=size, height=size),
            settings=TuneSettings(steps=args.tune_steps, checkpoint_every=0),
        )  # fmt: skip
        workflow.tune(session, tune)
    store = Project(project)
    tuned = store.find("tunes", store.current_tune())
    components, _ = session.tuned_unet(store, tuned)
    vae = components.vae
    clean = store.find("latents", tuned.spec["latents"]).tensors()["mean"] * vae.config.scaling_factor
    ceiling = decode_latents(vae, clean)
    iterations, rate = int(args.fit[0]), args.fit[1]
    modes: dict[str, dict[str, Any]] = {
        "ddim (empty prompt)": {},
        "ddim (source prompt)": {"tune_key": tuned.key, "invert_steps": args.steps, "invert_prompt": SOURCE},
        "negative-prompt": {"inversion": InversionSettings(inversion="negative-prompt")},
        "null-text (paper: 10 x 1e-2)": {"inversion": InversionSettings(inversion="null-text")},
        f"null-text ({iterations} x {rate:g})": {
            "inversion": InversionSettings(inversion="null-text", null_iterations=iterations, null_lr=rate)
        },
    }
    rows = []
    for guidance in args.guidance:
        settings = EditSettings(steps=args.steps, guidance=guidance)
        for mode, extra in modes.items():
            request = EditRequest(project=project, prompts=[SOURCE], settings=settings, format="frames", **extra)
            [edited] = workflow.edit(session, request)
            entry = store.find("edits", edited.key)
            latents = entry.tensors()["latents"]
            inversion = store.find("inversions", entry.spec["inversion"]).meta()
            row = {
                "guidance": guidance,
                "inversion": mode,
                "latent_mse": torch.nn.functional.mse_loss(latents, clean).item(),
                "psnr_db": _psnr(decode_latents(vae, latents), ceiling),
                "inversion_step_s": inversion["seconds"] / args.steps,
            }
            if "null_text" in entry.spec:
                fit = store.find("nulltexts", entry.spec["null_text"]).meta()
                fits, started = len(store.complete_keys("nulltexts")), time.perf_counter()
                again = EditRequest(project=project, prompts=["a panda is skiing"], settings=settings, **extra)
                workflow.edit(session, again)
                row |= {"fit_s": fit["seconds"], "fit_step_s": fit["seconds"] / args.steps}
                row |= {"second_edit_s": time.perf_counter() - started}
                row |= {"second_edit_fits": len(store.complete_keys("nulltexts")) - fits}
            rows.append(row)
    vae_psnr = _psnr(ceiling, _source_frames(session, store, tuned))
    print(json.dumps({"config": args.config, "frames": args.frames, "size": size, "steps": args.steps,
                      "tune_steps": args.tune_steps, "vae_psnr_db": vae_psnr, "rows": rows}, indent=1))  # fmt: skip


def _psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def _source_frames(session: Any, store: Project, tuned: Any) -> np.ndarray:
    """The tuned frames as decoded from the clip: what the VAE's own reconstruction is measured against."""
    from tavcli.workflow.session import source_frames

    latents = store.find("latents", tuned.spec["latents"])
    return source_frames(session, latents, latents.meta()["clip"])


if __name__ == "__main__":
    main()
