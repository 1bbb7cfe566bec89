"""What the memory pre-flight predicts for a Tune-A-Video tune of SDXL base 1.0, with SD 1.5 as the reference.

For each model: 8, 16 and 24 frames at 512, 768 and 1024 pixels square, with and without gradient
checkpointing, in half precision (fp16 by default; bf16 stores the same 2 bytes and gives the same counts), and
which 16, 24, 40 and 80 GB cards that fits by the rule of `tav tune --dry-run`'s card table (`card_fits`: the
card's size in GiB less `CUDA_CONTEXT`); then the most frames each card fits at each size.

The numbers are the pre-flight's own: `probe_activations` runs a real forward and backward of the full-size
inflated UNet (declared in `tavcli.models.architectures`, inflated as `tav tune --dry-run` inflates it, SDXL with
zero size numbers) on the CPU, and `tune_estimate` extrapolates. The probe counts storage sizes, never values, so
the 2D weights are zeros that nothing writes: on Linux the 10 GB of SDXL's float32 2D weights stay untouched pages
and take no memory (`tests/test_sdxl_memory.py` checks the counts equal those of a model with random weights). The
whole run takes 80 s and 11 GB of memory on 2 CPU cores (each model probed in a process of its own); `--narrow`
runs the narrow models instead, in seconds. `--check` measures training steps on the CPU instead (peak live
tensor bytes, as `tests/test_memory.py` does) and compares the estimate: 15 minutes for its default cases.

    python benchmarks/sdxl_memory.py [--json [FILE]] [--models sd15 sdxl] [--ranks 16] [--precision fp16] [--narrow]
    python benchmarks/sdxl_memory.py --check [FRAMESxSIZE ...] [--precision bf16]

`--json` alone prints JSON instead of the tables; `--json FILE` writes it there as well as printing the tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tavcli.method.low_rank import add_low_rank_adapters
from tavcli.method.memory import (
    CUDA_CONTEXT,
    MAX_FRAMES,
    ActivationProbe,
    MemoryEstimate,
    probe_activations,
    tune_estimate,
)
from tavcli.method.training import start_training, trained_parameters
from tavcli.method.video_unet import VideoUNet, inflate_unet
from tavcli.models.architectures import ARCHITECTURES, configs
from tavcli.models.conditioning import pooled_width
from tavcli.runtime import Runtime

MODELS = ("sd15", "sdxl")
FRAMES = (8, 16, 24)
SIZES = (512, 768, 1024)
CARDS_GB = (16, 24, 40, 80)
GIB = 2**30
Changes = Mapping[str, Mapping[str, Any]]  # part -> config keys to change, as `configs` takes them


def video_unet(
    name: str,
    narrow: bool = False,
    rank: int = 0,
    random: bool = False,
    device: str = "cpu",
    changes: Changes | None = None,
) -> VideoUNet:
    """Architecture `name`'s UNet, inflated as `tav tune --dry-run` inflates it, with rank-`rank` adapters (0: none).

    The 2D weights are zeros left untouched (they take no memory until written), or seeded random ones with
    `random`; the temporal layers are initialised as a tune's are. `device="meta"` makes no weights at all: enough
    to count them. `changes` are merged into the configs (`configs`).
    """
    config = configs(name, narrow, changes)["unet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if random or device == "meta":
            with torch.device(device):
                base = UNet2DConditionModel.from_config(config)
        else:
            with torch.device("meta"):
                base = UNet2DConditionModel.from_config(config)
            base = base.to_empty(device=device)
            _zero(base)
        time_ids = torch.zeros(6, device=device) if pooled_width(base.config) is not None else None
        with torch.device(device):
            unet = inflate_unet(base, time_ids=time_ids)
            if rank:
                add_low_rank_adapters(unet, rank)
    return unet


def _zero(module: torch.nn.Module) -> None:
    """Zero `module`'s fresh (`to_empty`) tensors, writing only those that are not zero already.

    Large tensors come from fresh pages, which read as zeros and stay unallocated as long as nothing writes
    them; a reused small block may hold anything, NaN included, and is written.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.any():
                tensor.zero_()


def estimate(unet: VideoUNet, probe: ActivationProbe, frames: int, size: int, checkpointing: bool) -> MemoryEstimate:
    """The pre-flight's estimate of a tune of `frames` frames at `size` x `size` pixels in `probe`'s precision."""
    probes = {"fp32" if probe.precision == "fp32" else "half": probe}
    return tune_estimate(unet, probes, frames, size, size, checkpointing, probe.precision)


def usable(gib: int) -> int:
    """What a `gib` GB card leaves a tune, by `card_fits`'s rule: its size less the CUDA context."""
    return gib * GIB - CUDA_CONTEXT


def most_frames(unet: VideoUNet, probe: ActivationProbe, size: int, checkpointing: bool, gib: int) -> int:
    """The most frames, up to `MAX_FRAMES`, whose tune at `size` fits a `gib` GB card (0: not even one)."""
    low, high = 0, MAX_FRAMES  # low frames fit (or low is 0), high do not
    if estimate(unet, probe, MAX_FRAMES, size, checkpointing).total <= usable(gib):
        return MAX_FRAMES
    while low < high - 1:
        middle = (low + high) // 2
        if estimate(unet, probe, middle, size, checkpointing).total <= usable(gib):
            low = middle
        else:
            high = middle
    return low


def measure(
    name: str, rank: int = 0, precision: str = "fp16", narrow: bool = False, changes: Changes | None = None
) -> dict[str, Any]:
    """Probe architecture `name` (with `rank` adapters, its configs with `changes`) in `precision`, then `report`."""
    started = time.perf_counter()
    unet = video_unet(name, narrow, rank, changes=changes)
    built = time.perf_counter()
    probe = probe_activations(unet, precision)
    probed = time.perf_counter()
    seconds = {"build": round(built - started, 1), "probe": round(probed - built, 1)}
    label = name + (f" --rank {rank}" if rank else "")
    return (
        {"model": label, "architecture": name, "narrow": narrow, "rank": rank}
        | report(unet, probe)
        | {"seconds": seconds}
    )


def report(
    unet: VideoUNet,
    probe: ActivationProbe,
    frames: tuple[int, ...] = FRAMES,
    sizes: tuple[int, ...] = SIZES,
    cards: tuple[int, ...] = CARDS_GB,
) -> dict[str, Any]:
    """Every case's estimate and the cards it fits, and the most frames each card fits per size: JSON-able."""
    first = estimate(unet, probe, frames[0], sizes[0], False)
    cases = []
    for size in sizes:
        for count in frames:
            for checkpointing in (False, True):
                case = estimate(unet, probe, count, size, checkpointing)
                cases.append(
                    {
                        "size": size,
                        "frames": count,
                        "checkpointing": checkpointing,
                        "peak_bytes": case.total,
                        "activation_bytes": case.activations,
                        "fits": {f"{gib} GB": case.total <= usable(gib) for gib in cards},
                    }
                )
    fitting = [
        {
            "size": size,
            "checkpointing": checkpointing,
            "most_frames": {f"{gib} GB": most_frames(unet, probe, size, checkpointing, gib) for gib in cards},
        }
        for size in sizes
        for checkpointing in (False, True)
    ]
    return {
        "precision": probe.precision,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "weights_bytes": first.weights,
        "training_state_bytes": first.training_state,
        "constant_activation_bytes": {"plain": probe.constant(False), "checkpointing": probe.constant(True)},
        "probe": {
            "tokens": [probe.small.tokens, probe.large.tokens],
            "saved_bytes": [probe.small.saved, probe.large.saved],
        },
        "cases": cases,
        "fitting": fitting,
    }


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages, as `tests/test_memory.py` counts it: on the CPU, what
    `torch.cuda.max_memory_allocated` counts on a GPU (without the allocator's rounding)."""

    def __init__(self, *held: torch.Tensor) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for tensor in held:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) in self.live:
            return
        self.live[id(storage)] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, id(storage))

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.track(tensor)
        return out


def measured_peak(unet: VideoUNet, precision: str, frames: int, size: int, checkpointing: bool) -> int:
    """Peak live bytes of a training step's forward and backward on the CPU, the UNet's weights counted as held,
    with diffusers' gradient checkpointing as `tav tune --gradient-checkpointing` enables it. No optimizer step:
    add AdamW's two moments (8 bytes a trained parameter) to compare with an estimate."""
    params = start_training(unet, checkpointing)  # as a tune does: only the trained tensors take gradients
    rows = 77 if pooled_width(unet.config) is None else 78  # SDXL's pooled embedding rides as one more row
    text = torch.zeros(1, rows, unet.config.cross_attention_dim)
    sample = torch.zeros(1, unet.config.in_channels, frames, size // 8, size // 8)
    try:
        with LiveBytes(*unet.parameters(), text, sample) as tracker:
            with Runtime(torch.device("cpu"), precision).autocast():
                prediction = unet(sample, torch.tensor([500]), text).sample
            F.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32)).backward()
    finally:
        unet.disable_gradient_checkpointing()
        for param in params.values():
            param.grad = None
        unet.requires_grad_(False)
    return tracker.peak


def check(
    name: str, precision: str, cases: list[tuple[int, int, bool]], limit_gib: float, narrow: bool = False
) -> list[dict[str, Any]]:
    """Each case's estimate (before the 10% margin) against a measured training step; a case whose estimated
    activations exceed `limit_gib` of this machine's memory is skipped."""
    unet = video_unet(name, narrow)
    probe = probe_activations(unet, precision)
    moments = 8 * sum(p.numel() for p in trained_parameters(unet).values())
    rows = []
    for frames, size, checkpointing in cases:
        guess = estimate(unet, probe, frames, size, checkpointing)
        row: dict[str, Any] = {"model": name, "frames": frames, "size": size, "checkpointing": checkpointing}
        row["estimate_bytes"] = guess.weights + guess.training_state + guess.activations
        row["estimated_activation_bytes"] = guess.activations
        if guess.activations > limit_gib * GIB:
            rows.append(row | {"measured_bytes": None})
            continue
        started = time.perf_counter()
        measured = measured_peak(unet, precision, frames, size, checkpointing) + moments
        row |= {
            "measured_bytes": measured,
            "measured_activation_bytes": measured - guess.weights - guess.training_state,
            "error": row["estimate_bytes"] / measured - 1,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"  {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def check_table(rows: list[dict[str, Any]], precision: str) -> str:
    gib = float(GIB)
    lines = [
        f"| model | clip | {precision} | measured | estimate | error | activations: measured | estimated |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        clip = f"{row['frames']} x {row['size']}x{row['size']}"
        mode = "checkpointing" if row["checkpointing"] else "plain"
        if row["measured_bytes"] is None:
            lines.append(
                f"| {row['model']} | {clip} | {mode} | (skipped) | {row['estimate_bytes'] / gib:.2f} GiB | | "
                f"| {row['estimated_activation_bytes'] / gib:.2f} GiB |"
            )
            continue
        lines.append(
            f"| {row['model']} | {clip} | {mode} | {row['measured_bytes'] / gib:.2f} GiB "
            f"| {row['estimate_bytes'] / gib:.2f} GiB | {row['error']:+.1%} "
            f"| {row['measured_activation_bytes'] / gib:.2f} GiB | {row['estimated_activation_bytes'] / gib:.2f} GiB |"
        )
    return "\n".join(lines)


def smallest_card(fits: dict[str, bool]) -> str:
    return next((card for card, fit in fits.items() if fit), "none")


def tables(results: list[dict[str, Any]]) -> str:
    """The results as markdown: the parts of each model, every case's peak, and the most frames per card."""
    gib = float(GIB)
    lines = [
        "| model | parameters | weights | gradients and AdamW | constant activations | probe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        constant = result["constant_activation_bytes"]
        lines.append(
            f"| {result['model']} | {result['parameters'] / 1e6:,.0f}M | {result['weights_bytes'] / gib:.1f} GiB "
            f"| {result['training_state_bytes'] / gib:.2f} GiB "
            f"| {constant['plain'] / gib:.2f} GiB ({constant['checkpointing'] / gib:.2f} with checkpointing) "
            f"| {result['seconds']['probe']:.0f} s |"
        )
    cards = list(results[0]["cases"][0]["fits"])
    lines += [
        "",
        "| model | size | frames | peak | smallest card | peak, checkpointing | smallest card, checkpointing |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for result in results:
        plain = [case for case in result["cases"] if not case["checkpointing"]]
        saving = [case for case in result["cases"] if case["checkpointing"]]
        for one, other in zip(plain, saving, strict=True):
            lines.append(
                f"| {result['model']} | {one['size']}x{one['size']} | {one['frames']} "
                f"| {one['peak_bytes'] / gib:.1f} GiB | {smallest_card(one['fits'])} "
                f"| {other['peak_bytes'] / gib:.1f} GiB | {smallest_card(other['fits'])} |"
            )
    lines += [
        "",
        "| model | size | " + " | ".join(f"{card}: plain / checkpointing" for card in cards) + " |",
        "|---|---|" + "---:|" * len(cards),
    ]
    for result in results:
        rows = {(row["size"], row["checkpointing"]): row["most_frames"] for row in result["fitting"]}
        for size in sorted({size for size, _ in rows}):
            cells = [
                " / ".join(_frames(rows[size, checkpointing][card]) for checkpointing in (False, True))
                for card in cards
            ]
            lines.append(f"| {result['model']} | {size}x{size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _frames(count: int) -> str:
    return f"{count}+" if count >= MAX_FRAMES else str(count)


def in_fresh_process(function: Any, *args: Any) -> Any:
    """`function(*args)` in a new process: a model's freed memory stays in this process's heap, where the next
    model's zero weights would land and be written, so each model gets a clean one."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="JSON to FILE, or alone: instead of tables"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(ARCHITECTURES))
    parser.add_argument("--ranks", type=int, nargs="*", default=[16], help="SDXL low-rank tunes to estimate too")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--narrow", action="store_true", help="the narrow models (seconds; not the real figures)")
    parser.add_argument(
        "--check",
        nargs="*",
        metavar="FRAMESxSIZE",
        help="instead: measure training steps on the CPU against the estimate (default 8x256 8x512), "
        "with and without checkpointing",
    )
    parser.add_argument("--check-limit-gib", type=float, default=10.0, help="skip checks with more activations")
    args = parser.parse_args()
    if args.check is not None:
        clips = [tuple(int(n) for n in clip.split("x")) for clip in args.check or ["8x256", "8x512"]]
        cases = [(frames, size, checkpointing) for frames, size in clips for checkpointing in (False, True)]
        rows = []
        for name in args.models:
            print(f"checking {name} in {args.precision}...", file=sys.stderr, flush=True)
            rows += in_fresh_process(check, name, args.precision, cases, args.check_limit_gib, args.narrow)
        if args.json:
            _write(args.json, {"precision": args.precision, "narrow": args.narrow, "checks": rows})
        if args.json != "-":
            print(check_table(rows, args.precision))
        return
    runs = [(name, 0) for name in args.models] + [("sdxl", rank) for rank in args.ranks if "sdxl" in args.models]
    results = []
    for name, rank in runs:
        print(f"probing {name}{f' --rank {rank}' if rank else ''} in {args.precision}...", file=sys.stderr, flush=True)
        results.append(in_fresh_process(measure, name, rank, args.precision, args.narrow))
        print(f"  {results[-1]['seconds']}", file=sys.stderr, flush=True)
    document = {
        "precision": args.precision,
        "narrow": args.narrow,
        "frames": list(FRAMES),
        "sizes": list(SIZES),
        "cards_gib": list(CARDS_GB),
        "cuda_context_bytes": CUDA_CONTEXT,
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        _write(args.json, document)
    if args.json != "-":
        print(tables(results))


def _write(path: str, document: dict[str, Any]) -> None:
    """JSON to stdout (`-`) or to a file."""
    if path == "-":
        print(json.dumps(document, indent=2))
        return
    with open(path, "w") as out:
        json.dump(document, out, indent=2)


if __name__ == "__main__":
    main()
