"""tavcli's speed and memory benchmark: prints one JSON object of medians (see docs/performance.md).

    python benchmarks/bench.py --config mid             # the CPU targets: 8 frames, 256x256, fp32, 2 threads
    python benchmarks/bench.py --config tiny            # seconds, for a quick look
    python benchmarks/bench.py --config sd15 --device cuda --precision bf16   # SD 1.5 shapes, 24x512x512
    python benchmarks/bench.py --config sd21-v --device cuda   # SD 2.1 768-v (also sd21-base), 24x768x768

Random weights of the named architecture are built once, saved with `save_pretrained` and loaded
back through tavcli's own loading code. Each measurement runs in a fresh process, so its peak
memory (process RSS on CPU, `torch.cuda.max_memory_allocated` on GPU) is its own:

- tune step, without and with gradient checkpointing (`tavcli.training.train_delta`, every trainable tensor);
- inversion step (`tavcli.inversion.ddim_inversion`) and guided sampling step (`tavcli.sampling.ddim_sample`);
- a whole edit per prompt (text encoding, sampling, VAE decode, mp4 write: `tavcli.workflow.edit`),
  and prompts per minute for 1 prompt and for 4 prompts in one `--batch-size 4` call;
- the same work on the plain, un-inflated 2D UNet with the same weights on the same folded
  frames, and each figure's ratio to it: the cost of the inflation itself.

Timings are medians of `--repeats` steps after `--warmup` steps. On a GPU each step's FLOPs are
counted (`torch.utils.flop_counter`) and divided by the device's peak to give the fraction reached.

`--contention` times something else: whole `tav tune` commands (`--tune-steps` steps, the
configuration's frames and size, through the real command line) alone, beside a busy process (a
Python busy loop), and two at once, each in a fresh project, with tavcli's choice of OpenMP wait
policy and with `TAV_WAIT_POLICY=off` (OpenMP's default, what tavcli did before). Its figures are
seconds and ratios to the same command alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

# Architectures come from tavcli.architectures (random weights, full size); `mid` is SD 1.5's structure at
# a fifth of its UNet width, for the CPU targets; `tiny` is tavcli's built-in model.
MID = {
    "unet": {"block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 256, "sample_size": 32},
    "vae": {"block_out_channels": [32, 64, 128, 128]},
    "text_encoder": {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "projection_dim": 256,
        "vocab_size": 626,  # the tiny tokenizer's
    },
}
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"frames": 8, "size": 128, "architecture": None},
    "mid": {"frames": 8, "size": 256, "architecture": "sd15", "changes": MID},
    "sd15": {"frames": 24, "size": 512, "architecture": "sd15"},
    "sd21-base": {"frames": 24, "size": 512, "architecture": "sd21-base"},
    "sd21-v": {"frames": 24, "size": 768, "architecture": "sd21-v"},
}
# Dense peak FLOP/s by GPU name fragment and dtype (vendor data sheets, SXM parts).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
}
PHASES = ("tune", "tune_checkpointing", "inversion", "sampling", "edit", "unet2d")


def build_model(config: str, folder: Path) -> Path:
    """A diffusers folder with random weights of `config`'s architecture (built once)."""
    spec = CONFIGS[config]
    if spec["architecture"] is None:
        from tavcli.loading import resolve_model

        return resolve_model("tiny").folder
    from tavcli.architectures import build_model as build_architecture

    return build_architecture(spec["architecture"], folder / config, changes=spec.get("changes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--frames", type=int, help="override the configuration's frame count")
    parser.add_argument("--size", type=int, help="override the configuration's frame size (pixels)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--edit-steps", type=int, default=10)
    parser.add_argument("--window", type=int, help="run inversion and sampling in windows of W frames (tav --window)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (tavcli --compile)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TAV_BENCH_DIR", ".tav-bench")))
    parser.add_argument("--contention", action="store_true", help="time whole tunes beside other busy processes")
    parser.add_argument("--tune-steps", type=int, default=30, help="training steps of each --contention tune")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = parser.parse_args()
    args.frames = args.frames or CONFIGS[args.config]["frames"]
    args.size = args.size or CONFIGS[args.config]["size"]
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.config, args.workdir / "models")
    if args.contention:
        print(json.dumps(run_contention(args, "tiny" if args.config == "tiny" else str(model)), indent=2))
        return
    results: dict[str, Any] = {}
    for phase in args.phases.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--phase", phase]
        print(f"[bench] {phase} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"phase {phase} failed:\n{done.stderr}")
        results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(summarise(args, results), indent=2))


def run_contention(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Seconds of whole `tav tune` commands alone, beside a busy process and two at once, per wait policy."""
    env = {**os.environ, "TAV_CACHE_DIR": str(args.workdir / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        command = [sys.executable, "-m", "tavcli", "tune", str(clip), "a man is skiing", "-m", model]
        command += ["--frames", str(args.frames), "--stride", "1", "--width", str(args.size)]
        command += ["--height", str(args.size), "--steps", str(args.tune_steps), "--checkpoint-every", "0"]

        def tunes(copies: int, policy: str) -> list[float]:
            runs = []
            for index in range(copies):
                project = args.workdir / f"contention-{os.getpid()}-{index}.tav"
                shutil.rmtree(project, ignore_errors=True)
                started = time.perf_counter()
                run_env = env if policy == "auto" else {**env, "TAV_WAIT_POLICY": policy}
                process = subprocess.Popen([*command, "-p", str(project)], env=run_env, stdout=subprocess.DEVNULL)
                runs.append((process, started, project))
            seconds = []
            for process, started, project in runs:
                if process.wait() != 0:
                    sys.exit(f"tav tune failed: {' '.join(command)}")
                seconds.append(round(time.perf_counter() - started, 2))
                shutil.rmtree(project, ignore_errors=True)
            return seconds

        tunes(1, "auto")  # builds the model and warms the file cache
        report: dict[str, Any] = {"config": args.config, "frames": args.frames, "size": args.size}
        report["tune_steps"] = args.tune_steps
        for policy in ("auto", "off"):
            alone = tunes(1, policy)[0]
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
            try:
                beside = tunes(1, policy)[0]
            finally:
                busy.kill()
                busy.wait()
            two = tunes(2, policy)
            report[policy] = {
                "alone_s": alone,
                "beside_busy_process_s": beside,
                "two_at_once_s": two,
                "ratio_beside_busy_process": round(beside / alone, 2),
                "ratio_two_at_once": round(max(two) / alone, 2),
            }
    report["environment"] = {"cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    return report


def summarise(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """One flat report: the figures, their ratios to the 2D UNet, and what was measured where."""
    figures: dict[str, Any] = {}
    for found in results.values():
        figures.update({k: v for k, v in found.items() if k != "environment"})
    base = results.get("unet2d", {})
    ratios = {
        name: round(figures[name] / base[base_name], 2)
        for name, base_name in [
            ("tune_step_s", "unet2d_tune_step_s"),
            ("tune_step_checkpointing_s", "unet2d_tune_step_s"),
            ("inversion_step_s", "unet2d_inversion_step_s"),
            ("sampling_step_s", "unet2d_sampling_step_s"),
        ]
        if name in figures and base_name in base
    }
    environment = next(iter(results.values()))["environment"] if results else {}
    return {
        "config": args.config,
        "frames": args.frames,
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "repeats": args.repeats,
        "compile": args.compile,
        **figures,
        "ratio_to_unet2d": ratios,
        "environment": environment,
    }


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from tavcli.loading import load_components, resolve_model
    from tavcli.runtime import resolve_runtime

    runtime = resolve_runtime(args.device, args.precision, compile=args.compile)
    folder = build_model(args.config, args.workdir / "models")
    source = resolve_model(str(folder))
    components = load_components(source, runtime.device, runtime.dtype)
    latent = args.size // 8
    shape = (1, 4, args.frames, latent, latent)
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=generator).to(runtime.device)
    std = torch.full(shape, 0.1, device=runtime.device)
    with torch.no_grad():
        from tavcli.loading import encode_prompts

        embeds = encode_prompts(components, ["a man is skiing", ""]).float()
    phase = {
        "tune": lambda: _tune(args, runtime, components, mean, std, embeds[:1], checkpointing=False),
        "tune_checkpointing": lambda: _tune(args, runtime, components, mean, std, embeds[:1], checkpointing=True),
        "inversion": lambda: _inversion(args, runtime, components, mean, embeds[1:]),
        "sampling": lambda: _sampling(args, runtime, components, mean, embeds),
        "edit": lambda: _edit(args, runtime, source),
        "unet2d": lambda: _unet2d(args, runtime, components, mean, embeds),
    }[args.phase]
    found = phase()
    found[f"{args.phase}_peak_memory_gb"] = round(_peak_memory(runtime) / 1e9, 3)
    found["environment"] = _environment(runtime)
    return found


def _tune(args: Any, runtime: Any, components: Any, mean: Any, std: Any, embeds: Any, checkpointing: bool) -> dict:
    import torch

    from tavcli.requests import TuneSettings
    from tavcli.training import train_delta
    from tavcli.video_unet import inflate_unet, trainable_parameters

    torch.manual_seed(0)
    unet = inflate_unet(components.unet)
    settings = TuneSettings(steps=args.warmup + args.repeats, gradient_checkpointing=checkpointing, checkpoint_every=0)
    stamps = _Stamps(runtime)
    flops = _flops(runtime, lambda: _train_once(unet, runtime, mean, embeds))
    scaling = components.vae.config.scaling_factor
    train_delta(unet, components.scheduler, mean, std, scaling, embeds, settings, runtime, lambda **_: stamps())
    name = "tune_step_checkpointing_s" if checkpointing else "tune_step_s"
    trainable = sum(p.numel() for p in trainable_parameters(unet).values())
    return {
        name: stamps.median(args.warmup),
        **_flop_report(name, flops, stamps.median(args.warmup), runtime),
        "trainable_parameters_m": round(trainable / 1e6, 2),
    }


def _train_once(unet: Any, runtime: Any, sample: Any, embeds: Any) -> None:
    import torch

    unet.train()
    with runtime.autocast():
        loss = unet(sample, torch.tensor([500], device=sample.device), embeds).sample.float().square().mean()
    loss.backward()
    unet.zero_grad(set_to_none=True)


def _inversion(args: Any, runtime: Any, components: Any, latents: Any, empty: Any) -> dict:
    import torch

    from tavcli.inversion import ddim_inversion
    from tavcli.video_unet import inflate_unet
    from tavcli.workflow.editing import windowed

    torch.manual_seed(0)
    unet = windowed(runtime.prepare(inflate_unet(components.unet).eval()), args.window)
    stamps = _Stamps(runtime)
    flops = _flops(runtime, lambda: ddim_inversion(unet, components.scheduler, latents, empty, 1))
    with runtime.autocast():
        ddim_inversion(unet, components.scheduler, latents, empty, args.warmup + args.repeats, lambda *_: stamps())
    seconds = stamps.median(args.warmup)
    return {"inversion_step_s": seconds, **_flop_report("inversion_step_s", flops, seconds, runtime)}


def _sampling(args: Any, runtime: Any, components: Any, noise: Any, embeds: Any) -> dict:
    import torch

    from tavcli.sampling import ddim_sample
    from tavcli.video_unet import inflate_unet

    torch.manual_seed(0)
    unet = runtime.prepare(inflate_unet(components.unet).eval())
    stamps = _Stamps(runtime)
    cond, uncond = embeds[:1], embeds[1:]
    flops = _flops(runtime, lambda: ddim_sample(unet, components.scheduler, noise, cond, uncond, 1, 12.5))
    with runtime.autocast():
        ddim_sample(
            unet,
            components.scheduler,
            noise,
            cond,
            uncond,
            args.warmup + args.repeats,
            12.5,
            on_step=lambda *_: stamps(),
        )
    seconds = stamps.median(args.warmup)
    return {"sampling_step_s": seconds, **_flop_report("sampling_step_s", flops, seconds, runtime)}


def _edit(args: Any, runtime: Any, source: Any) -> dict:
    """Whole edits through the workflow, as `tav edit` runs them, on the bundled clip."""
    from tavcli import workflow
    from tavcli.requests import EditRequest, EditSettings, FrameSelection, FrameSize, TuneSettings

    project = args.workdir / f"edit-{args.config}-{os.getpid()}.tav"
    session = workflow.Session(runtime)
    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        request = workflow.TuneRequest(
            clip,
            "a man is skiing",
            project,
            source.name,
            FrameSelection(frames=args.frames, stride=1),
            FrameSize(args.size, args.size),
            TuneSettings(steps=1, checkpoint_every=0),
        )
        workflow.tune(session, request)
    settings = EditSettings(steps=args.edit_steps)
    workflow.edit(session, EditRequest(project, ["warm-up"], settings))  # inverts, builds the tuned UNet
    singles = []
    for index in range(args.repeats):
        started = time.perf_counter()
        workflow.edit(session, EditRequest(project, [f"a panda is skiing, take {index}"], settings))
        singles.append(time.perf_counter() - started)
    started = time.perf_counter()
    bears = [f"a bear is skiing, take {i}" for i in range(4)]
    workflow.edit(session, EditRequest(project, bears, settings, batch_size=4))
    four = time.perf_counter() - started
    shutil.rmtree(project, ignore_errors=True)
    per_prompt = statistics.median(singles)
    return {
        "edit_steps": args.edit_steps,
        "edit_per_prompt_s": round(per_prompt, 3),
        "prompts_per_minute_1": round(60 / per_prompt, 2),
        "prompts_per_minute_4_batched": round(4 * 60 / four, 2),
    }


def _unet2d(args: Any, runtime: Any, components: Any, latents: Any, embeds: Any) -> dict:
    """The same steps on the plain 2D UNet over the folded frames (b*f, c, h, w)."""
    import torch

    unet = components.unet
    frames = latents.shape[2]
    folded = latents[0].transpose(0, 1).contiguous()
    cond, uncond = embeds[:1].expand(frames, -1, -1), embeds[1:].expand(frames, -1, -1)
    t = torch.tensor([500], device=latents.device)
    params = [p for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_q")) for p in m.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-5)

    def train() -> None:
        unet.train()
        with runtime.autocast():
            loss = unet(folded, t, cond).sample.float().square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def invert() -> None:
        unet.eval()
        with runtime.autocast():
            unet(folded, t, uncond)

    @torch.no_grad()
    def sample() -> None:
        unet.eval()
        with runtime.autocast():
            unet(torch.cat([folded, folded]), t, torch.cat([uncond, cond]))

    return {
        f"unet2d_{name}_step_s": _median_time(step, args.warmup, args.repeats, runtime)
        for name, step in [("tune", train), ("inversion", invert), ("sampling", sample)]
    }


class _Stamps:
    """Records the time of each callback; the differences are step times."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.times = [time.perf_counter()]

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _sync(self.runtime)
        self.times.append(time.perf_counter())

    def median(self, warmup: int) -> float:
        steps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return round(statistics.median(steps[warmup:]), 4)


def _median_time(step: Callable[[], None], warmup: int, repeats: int, runtime: Any) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(runtime)
        started = time.perf_counter()
        step()
        _sync(runtime)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def _flops(runtime: Any, step: Callable[[], Any]) -> float | None:
    """FLOPs of one step, counted on GPU only (counting costs a step; on CPU it adds nothing we use)."""
    if runtime.device.type != "cuda":
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, runtime.autocast():
        step()
    return float(counter.get_total_flops())


def _flop_report(name: str, flops: float | None, seconds: float, runtime: Any) -> dict[str, Any]:
    if flops is None:
        return {}
    import torch

    achieved = flops / seconds
    gpu = torch.cuda.get_device_name(runtime.device)
    peak = next((table[runtime.precision] for key, table in PEAK_FLOPS.items() if key in gpu), None)
    stem = name.removesuffix("_s")
    return {f"{stem}_tflops": round(achieved / 1e12, 1), f"{stem}_peak_fraction": peak and round(achieved / peak, 3)}


def _sync(runtime: Any) -> None:
    import torch

    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _peak_memory(runtime: Any) -> float:
    import torch

    if runtime.device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(runtime.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def _environment(runtime: Any) -> dict[str, Any]:
    import platform

    import torch

    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else platform.processor()
    return {
        "torch": torch.__version__,
        "device_name": device or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    main()
