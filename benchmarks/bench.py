"""tavcli's speed and memory benchmark: prints one JSON object of medians (see docs/performance.md).

    python benchmarks/bench.py --config mid             # the CPU targets: 8 frames, 256x256, fp32, 2 threads
    python benchmarks/bench.py --config tiny            # seconds, for a quick look
    python benchmarks/bench.py --config sd15 --device cuda --precision bf16   # SD 1.5 shapes, 24x512x512
    python benchmarks/bench.py --config sd21-v --device cuda   # SD 2.1 768-v (also sd21-base), 24x768x768
    python benchmarks/bench.py --config sdxl --device cuda --precision bf16   # SDXL base 1.0 shapes, 6x512x512
    python benchmarks/bench.py --config sdxl-narrow --frames 2 --size 64      # SDXL narrow: seconds on a CPU

Random weights of the named architecture are built once, saved with `save_pretrained` and loaded
back through tavcli's own loading code, once per measurement, into a `tavcli.workflow.Session`.
Each measurement runs in a fresh process, so its peak memory (process RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU) is its own:

- tune step, without and with gradient checkpointing (`tavcli.method.training.train_delta`, every trainable
  tensor), with the VAE and text encoder offloaded to the CPU on a GPU, as `tav tune` runs;
- inversion step (`tavcli.method.inversion.ddim_inversion`) and guided sampling step
  (`tavcli.method.sampling.ddim_sample`);
- a whole edit per prompt (text encoding, sampling, VAE decode, mp4 write: `tavcli.workflow.edit`),
  and prompts per minute for 1 prompt and for 4 prompts in one `--batch-size 4` call, on a project
  tuned for one step by `tav tune` in a child process (so neither its load nor its peak counts);
- on request (`--phases sampling,sampling_fusion,sampling_branch`), guided steps under attention control with
  every control on at every step: FateZero's fusion from a trajectory and Video-P2P's sampled source branch
  (`tavcli.method.attention_control`), with their ratios to the plain step (`attention_control_ratio_to_sampling`);
- the same loops (`train_delta`, `ddim_inversion`, `ddim_sample`) on the plain, un-inflated 2D UNet
  with the same weights on the same folded frames, through the same `Runtime` (`--compile`, fused
  AdamW on GPUs), and each figure's ratio to it: the cost of the inflation itself.

Timings are medians of `--repeats` steps after `--warmup` steps. On a GPU each step's FLOPs are
counted (`torch.utils.flop_counter`) and divided by the device's dense peak for the arithmetic used
(`environment.peak` names the row and the arithmetic: fp32 counts at the TF32 peak when TF32 is on).

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
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# Architectures come from tavcli.models.architectures (random weights, full size, or `narrow`: every structural
# choice kept, a tenth of the widths); `mid` is SD 1.5's structure at a fifth of its UNet width, for the CPU
# targets; `tiny` is tavcli's built-in model. SDXL at what `tav tune` gives it by default, 6 frames of 512x512
# (`tavcli.settings.options.MODEL_DEFAULTS`: what the pre-flight fits a 24 GB card): a UNet forward over them is
# half SD 1.5's over 24 frames of 512x512 (9.5 against 19.3 TFLOP, counted by torch.utils.flop_counter); 8 frames
# of 768x768 would be 1.5 times SD 1.5's, 8 of 1024x1024 2.8 times.
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
    "sdxl": {"frames": 6, "size": 512, "architecture": "sdxl"},
    "sdxl-narrow": {"frames": 6, "size": 128, "architecture": "sdxl", "narrow": True},
}
PHASES = ("tune", "tune_checkpointing", "inversion", "sampling", "edit", "unet2d")
# Attention control (`--phases sampling,sampling_branch,sampling_fusion`): guided steps with every control on.
CONTROLLED = ("sampling_branch", "sampling_fusion")
# Dense peak FLOP/s (no 2:4 sparsity: NVIDIA's data sheets quote tensor-core figures with it, twice
# these) by arithmetic, per GPU. The first row whose pattern matches `torch.cuda.get_device_name` wins:
# whole words only ("A100" is not in "RTX A1000"), a family's variants before its plain name, and
# variants with fewer cores (RTX 4090 D, laptop parts) match no row rather than a faster one's.
# Sources: NVIDIA H100 data sheet and product brief PB-11133-001 (SXM: FP32 67, TF32 989*, BF16/FP16
# 1,979*; PCIe: 51, 756*, 1,513*; NVL: 60, 835*, 1,671*; * with sparsity); H200 data sheet (SXM as
# H100 SXM, NVL as H100 NVL: the same GH100 compute); A100 data sheet (FP32 19.5, TF32 156, BF16 312,
# SXM and PCIe alike); L40S data sheet (FP32 91.6, TF32 183, BF16 362.05); Ada architecture
# whitepaper, RTX 4090 (FP32 82.6, TF32 82.6, FP16/BF16 with FP32 accumulate 165.2: what PyTorch uses).
_HOPPER_SXM = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}
_HOPPER_NVL = {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}
_ADA_4090 = {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}
PEAK_FLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("H100 NVL", r"\bH100\b.*\bNVL\b", _HOPPER_NVL),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 SXM", r"\bH100\b", _HOPPER_SXM),  # the SXM part is "NVIDIA H100 80GB HBM3"
    ("H200 NVL", r"\bH200\b.*\bNVL\b", _HOPPER_NVL),
    ("H200 SXM", r"\bH200\b", _HOPPER_SXM),
    ("A100", r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", r"\bL40S\b", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("RTX 4090", r"\bRTX 4090\b(?!\s+(?:D|Laptop)\b)", _ADA_4090),
)


@dataclass(frozen=True)
class Peak:
    """A GPU's dense peak for the arithmetic a run uses: its row in PEAK_FLOPS, the arithmetic, FLOP/s."""

    row: str
    arithmetic: str  # bf16, fp16, tf32 or fp32
    flops: float


def peak_flops(device_name: str, precision: str, tf32: bool) -> Peak | None:
    """The dense peak of `device_name` for `precision` (fp32 at the TF32 peak when `tf32`); None for unknown GPUs."""
    arithmetic = "tf32" if precision == "fp32" and tf32 else precision
    for row, pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return Peak(row, arithmetic, peaks[arithmetic])
    return None


def tf32_in_use() -> bool:
    """Whether fp32 work may run on TF32 tensor cores, whose peak is 8x fp32's: a plain fp32 peak would allow
    fractions over 1. Matrix products use TF32 when asked (off by default); cuDNN convolutions by default."""
    import torch

    matmul = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return bool(matmul or torch.backends.cudnn.allow_tf32)


def _peak(runtime: Any) -> Peak | None:
    import torch

    if runtime.device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(runtime.device), runtime.precision, tf32_in_use())


def build_model(config: str, folder: Path) -> Path:
    """A diffusers folder with random weights of `config`'s architecture (built once)."""
    spec = CONFIGS[config]
    if spec["architecture"] is None:
        from tavcli.models.resolving import resolve_model

        return resolve_model("tiny").folder
    from tavcli.models.architectures import build_model as build_architecture

    narrow = bool(spec.get("narrow", False))
    return build_architecture(spec["architecture"], folder / config, narrow=narrow, changes=spec.get("changes"))


def time_ids(unet: Any, size: int) -> Any:
    """SDXL's six size numbers for a `size` x `size` clip taken whole (nothing cropped), as an inflated SDXL UNet
    needs them; None for a UNet without them (SD 1.x/2.x)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return None
    from tavcli.models.conditioning import SizeConditioning

    return SizeConditioning(original=(size, size), crop_top_left=(0, 0), target=(size, size)).time_ids()


def image_unet(unet: Any, size: int) -> Any:
    """`unet` itself, or for SDXL the same weights (shared) in a 2D UNet that takes the packed text tensor (the
    pooled embedding as its last row) and the clip's size numbers as the video UNet does: the 2D baseline then
    differs from the video UNet by the inflation alone."""
    ids = time_ids(unet, size)
    if ids is None:
        return unet
    import torch
    from diffusers import UNet2DConditionModel

    from tavcli.models.conditioning import split_text

    class PackedTextUNet(UNet2DConditionModel):  # type: ignore[misc]  # diffusers is not followed: Any to mypy
        def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, **kwargs: Any) -> Any:
            sequence, added = split_text(encoder_hidden_states, self.config, ids)
            return super().forward(sample, timestep, sequence, added_cond_kwargs=added, **kwargs)

    with torch.device("meta"):
        plain = PackedTextUNet.from_config(unet.config)
    plain.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return plain.train(unet.training)


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
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES + CONTROLLED)}"
    )
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TAV_BENCH_DIR", ".tav-bench")))
    parser.add_argument("--contention", action="store_true", help="time whole tunes beside other busy processes")
    parser.add_argument("--tune-steps", type=int, default=30, help="training steps of each --contention tune")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--build", action="store_true", help="only build the model folder and print its path")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = parser.parse_args()
    args.frames = args.frames or CONFIGS[args.config]["frames"]
    args.size = args.size or CONFIGS[args.config]["size"]
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.config, args.workdir / "models")
    if args.build:  # the GPU check builds the folder once, here, so that every later step finds it
        print(model)
        return
    if args.contention:
        print(json.dumps(run_contention(args, "tiny" if args.config == "tiny" else str(model)), indent=2))
        return
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for phase in args.phases.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--phase", phase]
        print(f"[bench] {phase} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
        else:  # the other phases still run: one failure costs one figure, not the report
            failed[phase] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            print(f"[bench] {phase} failed:\n{done.stderr}", file=sys.stderr, flush=True)
        report = json.dumps({**summarise(args, results), **({"failed": failed} if failed else {})}, indent=2)
        if args.out is not None:  # rewritten whole after each phase: a later timeout keeps the earlier figures
            temp = args.out.with_suffix(".tmp")
            temp.write_text(report + "\n")
            os.replace(temp, args.out)
    print(report)
    if failed:
        sys.exit(f"{len(failed)} of {len(results) + len(failed)} phases failed: {', '.join(failed)}")


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
    controlled = {  # attention control's cost, as ratios to the plain guided step of the same run
        name: {
            "step": round(figures[f"{name}_step_s"] / figures["sampling_step_s"], 2),
            "peak_memory": round(figures[f"{name}_peak_memory_gb"] / figures["sampling_peak_memory_gb"], 2),
        }
        for name in CONTROLLED
        if f"{name}_step_s" in figures and "sampling_step_s" in figures
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
        **({"attention_control_ratio_to_sampling": controlled} if controlled else {}),
        "environment": environment,
    }


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process, its model loaded once into one session (the edit's workflow reuses it)."""
    import torch

    torch.set_num_threads(args.threads)
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.session import Session

    runtime = resolve_runtime(args.device, args.precision, compile=args.compile)
    model = str(build_model(args.config, args.workdir / "models"))
    session = Session(runtime)
    found = _edit(args, session, model) if args.phase == "edit" else _unet_phase(args, session, model)
    if f"{args.phase}_peak_memory_gb" not in found:  # phases that count FLOPs read their peaks before counting
        found.update(_peaks(runtime, args.phase))
    found["environment"] = _environment(runtime)
    return found


def _unet_phase(args: argparse.Namespace, session: Any, model: str) -> dict[str, Any]:
    """A UNet measurement on random latents of the configuration's shape and the embedded prompts."""
    import torch

    from tavcli.models.loading import encode_prompts

    runtime = session.runtime
    trains = args.phase in ("tune", "tune_checkpointing", "unet2d")
    components = session.model_to_train(model) if trains else session.model(model)
    latent = args.size // 8
    shape = (1, 4, args.frames, latent, latent)
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=generator).to(runtime.device)
    std = torch.full(shape, 0.1, device=runtime.device)
    with torch.no_grad():
        embeds = encode_prompts(components, ["a man is skiing", ""]).float()
    if args.phase in ("tune", "tune_checkpointing"):
        session.offload_frozen(model)  # as `tav tune`: on a GPU only the UNet stays while training
    phase = {
        "tune": lambda: _tune(args, runtime, components, mean, std, embeds[:1], checkpointing=False),
        "tune_checkpointing": lambda: _tune(args, runtime, components, mean, std, embeds[:1], checkpointing=True),
        "inversion": lambda: _inversion(args, runtime, components, session.sampling_unet(model), mean, embeds[1:]),
        "sampling": lambda: _sampling(args, runtime, components, session.sampling_unet(model), mean, embeds),
        "unet2d": lambda: _unet2d(args, session, components, mean, std, embeds),
        "sampling_branch": lambda: _controlled(args, runtime, components, session.sampling_unet(model), mean, "branch"),
        "sampling_fusion": lambda: _controlled(args, runtime, components, session.sampling_unet(model), mean, "fusion"),
    }[args.phase]
    return phase()


def _tune(args: Any, runtime: Any, components: Any, mean: Any, std: Any, embeds: Any, checkpointing: bool) -> dict:
    import torch

    from tavcli.method.video_unet import inflate_unet, trainable_parameters

    torch.manual_seed(0)
    unet = inflate_unet(components.unet, time_ids=time_ids(components.unet, args.size))
    seconds = _training_step_s(args, runtime, unet, components, mean, std, embeds, checkpointing)
    name = "tune_step_checkpointing_s" if checkpointing else "tune_step_s"
    peaks = _peaks(runtime, args.phase)  # the timed steps' own: read before the FLOP count's plain step runs
    flops = _flops(runtime, lambda: _train_once(unet, runtime, mean, embeds))
    trainable = sum(p.numel() for p in trainable_parameters(unet).values())
    return {
        name: seconds,
        **_flop_report(name, flops, seconds, runtime),
        "trainable_parameters_m": round(trainable / 1e6, 2),
        **peaks,
    }


def _training_step_s(
    args: Any, runtime: Any, unet: Any, components: Any, mean: Any, std: Any, embeds: Any, checkpointing: bool = False
) -> float:
    """Median seconds per `train_delta` step: `tav tune`'s loop (compile, AdamW, loss read per step) on `unet`."""
    from tavcli.method.training import TrainingRun, train_delta

    run = TrainingRun(steps=args.warmup + args.repeats, gradient_checkpointing=checkpointing)
    stamps = _Stamps(runtime)
    scaling = components.vae.config.scaling_factor
    train_delta(unet, components.scheduler, mean, std, scaling, embeds, run, runtime, lambda **_: stamps())
    return stamps.median(args.warmup)


def _train_once(unet: Any, runtime: Any, sample: Any, embeds: Any) -> None:
    """One plain training step's forward and backward, gradients for the tuned tensors only (as `tav tune`)."""
    import torch

    from tavcli.method.video_unet import trainable_parameters

    unet.requires_grad_(False)
    for param in trainable_parameters(unet).values():
        param.requires_grad_(True)
    unet.train()
    with runtime.autocast():
        loss = unet(sample, torch.tensor([500], device=sample.device), embeds).sample.float().square().mean()
    loss.backward()
    unet.zero_grad(set_to_none=True)


def _inversion(args: Any, runtime: Any, components: Any, held: Any, latents: Any, empty: Any) -> dict:
    """Inversion steps of the UNet inflated from `held` (the 2D UNet as sampling holds it)."""
    import torch

    from tavcli.method.inversion import ddim_inversion
    from tavcli.method.video_unet import inflate_unet
    from tavcli.method.windows import windowed

    torch.manual_seed(0)
    eager = inflate_unet(held, time_ids=time_ids(held, args.size)).to(held.dtype).eval()
    unet = windowed(runtime.prepare(eager), args.window)
    seconds = _inversion_step_s(args, runtime, unet, components.scheduler, latents, empty)
    peaks = _peaks(runtime, "inversion")
    flops = _flops(
        runtime, lambda: ddim_inversion(windowed(eager, args.window), components.scheduler, latents, empty, 1)
    )
    report = {"inversion_step_s": seconds, **_flop_report("inversion_step_s", flops, seconds, runtime)}
    return {**report, **peaks}


def _inversion_step_s(args: Any, runtime: Any, unet: Any, scheduler: Any, latents: Any, empty: Any) -> float:
    """Median seconds per `ddim_inversion` step of `unet` (already prepared by the runtime)."""
    from tavcli.method.inversion import ddim_inversion

    stamps = _Stamps(runtime)
    with runtime.autocast():
        ddim_inversion(unet, scheduler, latents, empty, args.warmup + args.repeats, lambda *_: stamps())
    return stamps.median(args.warmup)


def _sampling(args: Any, runtime: Any, components: Any, held: Any, noise: Any, embeds: Any) -> dict:
    """Guided sampling steps of the UNet inflated from `held` (the 2D UNet as sampling holds it)."""
    import torch

    from tavcli.method.sampling import Guidance, ddim_sample
    from tavcli.method.video_unet import inflate_unet

    torch.manual_seed(0)
    eager = inflate_unet(held, time_ids=time_ids(held, args.size)).to(held.dtype).eval()
    unet = runtime.prepare(eager)
    cond, uncond = embeds[:1], embeds[1:]
    seconds = _sampling_step_s(args, runtime, unet, components.scheduler, noise, cond, uncond)
    peaks = _peaks(runtime, "sampling")
    flops = _flops(runtime, lambda: ddim_sample(eager, components.scheduler, noise, cond, uncond, 1, Guidance(12.5)))
    report = {"sampling_step_s": seconds, **_flop_report("sampling_step_s", flops, seconds, runtime)}
    return {**report, **peaks}


def _sampling_step_s(args: Any, runtime: Any, unet: Any, scheduler: Any, noise: Any, cond: Any, uncond: Any) -> float:
    """Median seconds per guided `ddim_sample` step of `unet` (already prepared by the runtime)."""
    from tavcli.method.sampling import Guidance, ddim_sample

    stamps = _Stamps(runtime)
    steps = args.warmup + args.repeats
    with runtime.autocast():
        ddim_sample(unet, scheduler, noise, cond, uncond, steps, Guidance(12.5), on_step=lambda *_: stamps())
    return stamps.median(args.warmup)


def _controlled(args: Any, runtime: Any, components: Any, held: Any, noise: Any, source: str) -> dict:
    """Guided steps under attention control with every control on at every step, each method with its own layers:
    Video-P2P's sampled source branch (`branch`: cross-attention and temporal self-attention replaced, local blend
    of a source and an edit word), or FateZero's fusion recomputed from a trajectory (`fusion`: cross-attention
    replaced, sparse-causal self-attention fused by the source word's region, the same local blend)."""
    import torch

    from tavcli.method.attention_control import AttentionControl, ControlSchedule, SelfKind, controlling
    from tavcli.method.controlled_sampling import AttentionSteering, SourceBranch, SourceTrajectory
    from tavcli.method.local_blend import LocalBlend
    from tavcli.method.prompt_words import token_map, word_tokens
    from tavcli.method.sampling import Guidance, ddim_sample
    from tavcli.method.video_unet import inflate_unet
    from tavcli.models.loading import encode_prompts

    torch.manual_seed(0)
    unet = runtime.prepare(inflate_unet(held, time_ids=time_ids(held, args.size)).to(held.dtype).eval())
    source_prompt, prompt = "a man is skiing", "a dog is skiing"
    with torch.no_grad():
        cond, uncond, text = encode_prompts(components, [prompt, "", source_prompt]).float().split(1)
    steps = args.warmup + args.repeats
    tokenizer = components.tokenizer
    blend = LocalBlend(
        word_tokens(tokenizer, source_prompt, ["man"]), [word_tokens(tokenizer, prompt, ["dog"])], args.frames
    )
    kinds: frozenset[SelfKind] = frozenset({"spatial" if source == "fusion" else "temporal"})
    tokens = (token_map(tokenizer, source_prompt, prompt, None),)
    schedule = ControlSchedule(steps, steps, steps, kinds, tokens, fuse_self=source == "fusion", blend=blend)
    control = AttentionControl(schedule, [list(range(args.frames))])
    trajectory = torch.randn(steps + 1, *noise.shape, generator=torch.Generator().manual_seed(1)).to(noise)
    origin = SourceTrajectory(trajectory, text) if source == "fusion" else SourceBranch(noise, text, text)
    guidance = Guidance(12.5)
    steering = AttentionSteering(unet, control, origin, 1, guidance)
    stamps = _Stamps(runtime)
    with controlling(unet, control), runtime.autocast():
        ddim_sample(
            unet,
            components.scheduler,
            noise,
            cond,
            uncond,
            steps,
            guidance,
            on_step=lambda *_: stamps(),
            steering=steering,
        )
    return {f"{args.phase}_step_s": stamps.median(args.warmup)}


def fatezero_bytes(architecture: str, frames: int, size: int, steps: int, bytes_per_value: int = 2) -> int:
    """The bytes FateZero's stored maps take (docs/performance.md): at every inversion step, the attention
    probabilities of every spatial (sparse-causal: 2n keys) and cross-attention (77 keys) layer of at most 32x32
    queries, per frame and head, of the architecture's UNet at `size` pixels; fp16 by default."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    from tavcli.models.architectures import configs

    config = configs(architecture)["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    levels, latent = len(config["block_out_channels"]), size // 8
    total = 0
    for name, block in unet.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        part, _, rest = name.partition(".")
        level = int(rest.split(".")[0]) if part == "down_blocks" else levels - 1
        level = levels - 1 - int(rest.split(".")[0]) if part == "up_blocks" else level
        side = -(-latent // 2**level)
        queries = side * side
        if queries <= 32 * 32:
            total += block.attn1.heads * queries * 2 * queries + block.attn2.heads * queries * 77
    return total * frames * steps * bytes_per_value


def _edit(args: Any, session: Any, model: str) -> dict:
    """Whole edits through the workflow, as `tav edit` runs them, on a project of the bundled clip."""
    from tavcli import workflow
    from tavcli.settings.editing import EditRequest
    from tavcli.settings.sampling import EditSettings

    project = _tuned_project(args, model)
    settings = EditSettings(steps=args.edit_steps)
    workflow.edit(
        session, EditRequest(project=project, prompts=["warm-up"], settings=settings)
    )  # inverts, builds the tuned UNet
    singles = []
    for index in range(args.repeats):
        started = time.perf_counter()
        workflow.edit(
            session, EditRequest(project=project, prompts=[f"a panda is skiing, take {index}"], settings=settings)
        )
        singles.append(time.perf_counter() - started)
    started = time.perf_counter()
    bears = [f"a bear is skiing, take {i}" for i in range(4)]
    workflow.edit(session, EditRequest(project=project, prompts=bears, settings=settings, batch_size=4))
    four = time.perf_counter() - started
    shutil.rmtree(project, ignore_errors=True)
    per_prompt = statistics.median(singles)
    return {
        "edit_steps": args.edit_steps,
        "edit_per_prompt_s": round(per_prompt, 3),
        "prompts_per_minute_1": round(60 / per_prompt, 2),
        "prompts_per_minute_4_batched": round(4 * 60 / four, 2),
    }


def _tuned_project(args: Any, model: str) -> Path:
    """A project of the bundled clip tuned for one step by `tav tune` in a child process: its model load
    and its training peak stay out of this process, whose peak is then the edits' own."""
    project = args.workdir / f"edit-{args.config}-{os.getpid()}.tav"
    with resources.as_file(resources.files("tavcli") / "data" / "man-skiing.mp4") as clip:
        command = [sys.executable, "-m", "tavcli", "tune", str(clip), "a man is skiing", "-m", model]
        command += ["-p", str(project), "--frames", str(args.frames), "--stride", "1"]
        command += ["--width", str(args.size), "--height", str(args.size), "--steps", "1", "--checkpoint-every", "0"]
        command += ["--device", args.device, "--precision", args.precision]
        done = subprocess.run([*command, "-q"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tav tune failed: {' '.join(command)}\n{done.stderr}")
    return project


def _unet2d(args: Any, session: Any, components: Any, latents: Any, std: Any, embeds: Any) -> dict:
    """The same loops on the plain 2D UNet over the folded frames (b*f, c, h, w), through the same runtime:
    `train_delta` (compiled with --compile, fused AdamW on GPUs, the loss read each step) on the float32
    weights, then inversion and guided sampling with the weights as sampling holds them (`Session.sampling_unet`).
    Only the inflation differs from the video figures."""
    runtime, frames = session.runtime, latents.shape[2]
    folded, folded_std = _fold(latents), _fold(std)
    cond, uncond = embeds[:1].expand(frames, -1, -1), embeds[1:].expand(frames, -1, -1)
    trained = image_unet(components.unet, args.size)
    tune = _training_step_s(args, runtime, trained, components, folded, folded_std, cond)
    held = image_unet(session.sampling_unet(components.source.name), args.size)
    unet, scheduler = runtime.prepare(held.eval()), components.scheduler
    return {
        "unet2d_tune_step_s": tune,
        "unet2d_inversion_step_s": _inversion_step_s(args, runtime, unet, scheduler, folded, uncond),
        "unet2d_sampling_step_s": _sampling_step_s(args, runtime, unet, scheduler, folded, cond, uncond),
    }


def _fold(video: Any) -> Any:
    """(1, c, f, h, w) latents as f images (f, c, h, w): what the 2D UNet sees of a clip."""
    return video[0].transpose(0, 1).contiguous()


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


def _counts_flops(runtime: Any) -> bool:
    """FLOPs are counted on GPUs only (counting costs a step; on a CPU it adds nothing we use)."""
    return bool(runtime.device.type == "cuda")


def _flops(runtime: Any, step: Callable[[], Any]) -> float | None:
    """FLOPs of one step of an eager (never a compiled) module, after the timed steps: under a counting mode
    the compiler gives up on a function for good, so counting a compiled one first would time it eager."""
    if not _counts_flops(runtime):
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, runtime.autocast():
        step()
    return float(counter.get_total_flops())


def _flop_report(name: str, flops: float | None, seconds: float, runtime: Any) -> dict[str, Any]:
    """FLOP/s reached and their fraction of the device's peak (None for a GPU without a row)."""
    if flops is None:
        return {}
    achieved = flops / seconds
    peak = _peak(runtime)
    stem = name.removesuffix("_s")
    fraction = round(achieved / peak.flops, 3) if peak else None
    return {f"{stem}_tflops": round(achieved / 1e12, 1), f"{stem}_peak_fraction": fraction}


def _sync(runtime: Any) -> None:
    import torch

    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _peaks(runtime: Any, phase: str) -> dict[str, float]:
    """The peaks so far, in GB: on a GPU the tensors' (`max_memory_allocated`) and what the caching allocator
    held (`max_memory_reserved`); on a CPU the process's peak RSS (Linux reports KiB)."""
    import torch

    if runtime.device.type == "cuda":
        return {
            f"{phase}_peak_memory_gb": round(torch.cuda.max_memory_allocated(runtime.device) / 1e9, 3),
            f"{phase}_peak_reserved_gb": round(torch.cuda.max_memory_reserved(runtime.device) / 1e9, 3),
        }
    return {f"{phase}_peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}


def _environment(runtime: Any) -> dict[str, Any]:
    import platform

    import torch

    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else platform.processor()
    peak = _peak(runtime)
    return {
        "torch": torch.__version__,
        "device_name": device or platform.machine(),
        # The peak `*_peak_fraction` divides by: which row, which arithmetic (tf32 for fp32 when TF32 is on).
        "peak": peak and {"row": peak.row, "arithmetic": peak.arithmetic, "tflops": round(peak.flops / 1e12, 1)},
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    main()
