"""Where and in what precision the work runs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from tavcli.choices import Precision
from tavcli.errors import TavError

__all__ = ["DTYPES", "Runtime", "available_devices", "bf16_is_native", "resolve_runtime"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """A device, the precision the UNet computes in (autocast) and frozen modules are stored in,
    and whether UNet calls go through `torch.compile`."""

    device: torch.device
    precision: str  # fp32, fp16 or bf16
    compile: bool = False

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to call: compiled with `--compile` (its parameters stay those of `module`)."""
        return torch.compile(module) if self.compile else module  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def generator(self, seed: int) -> torch.Generator:
        """The seeded generator of every random draw (training noise and timesteps, `--eta` noise).

        It lives on the CPU whatever the device, and draws are moved to the device: CUDA's and MPS's
        generators give other numbers for the same seed, and results must not depend on the device
        type beyond rounding (the device is not in any cache key). That costs a few MB of copies per step.
        """
        return torch.Generator("cpu").manual_seed(seed)

    def autocast(self) -> AbstractContextManager[object]:
        """Mixed precision for UNet calls: float32 weights, `dtype` matrix products."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_runtime(device: str = "auto", precision: Precision | str = "auto", compile: bool = False) -> Runtime:
    """`--device auto` picks CUDA, then Apple MPS, then the CPU.

    `--precision auto` is bf16 on CUDA GPUs with bf16 tensor cores (compute capability 8.0 and later,
    Ampere on: fp32's range, so no overflow), fp16 on older ones, fp32 elsewhere. fp16 and bf16 also
    run on a CPU (autocast).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise TavError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    _require_device(chosen, device)
    chosen = _on_its_gpu(chosen)
    if precision == "auto":
        precision = "fp32" if chosen.type != "cuda" else "bf16" if bf16_is_native(chosen) else "fp16"
    if precision not in DTYPES:
        raise TavError(f"unknown precision {precision!r}", "use auto, fp32, fp16 or bf16")
    if precision != "fp32":
        # What `upcast_attention` (SD 2.x) asks for: attention scores and softmax in fp32. SDPA does
        # that for half inputs on every backend, its math fallback too unless this flag allows half.
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    if chosen.type == "cpu":
        keep_freed_memory()
    return Runtime(device=chosen, precision=precision, compile=compile)


def _on_its_gpu(device: torch.device) -> torch.device:
    """A CUDA device with its index (`cuda` -> `cuda:N`, the current GPU), made the current GPU.

    Tensors say `cuda:N`, and `torch.device("cuda") != torch.device("cuda:0")`: with the index, comparisons with
    a tensor's device hold (the pre-flight finds the UNet's weights already there). Made current, it is the
    GPU that torch's device-less calls and the remedies tav names (`bf16_is_native`) ask about.
    """
    if device.type != "cuda":
        return device
    indexed = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    torch.cuda.set_device(indexed)
    return indexed


def _require_device(chosen: torch.device, given: str) -> None:
    """Refuse, in one line naming the devices there are, a device this machine does not have."""
    there = f"this machine has {', '.join(available_devices())}"
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise TavError(f"--device {given}: tav runs on cpu, cuda or mps devices", there)
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TavError(f"--device {given}: no CUDA GPU is available here", there)
        if chosen.index is not None and chosen.index >= count:
            raise TavError(f"--device {given}: there is no CUDA GPU {chosen.index} here", there)
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise TavError(f"--device {given}: no Apple GPU (MPS) is available here", there)


def available_devices() -> list[str]:
    """The devices `--device` can name here, CUDA GPUs with their names (`cuda:0 (NVIDIA A100)`)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = [f"cuda:{index} ({torch.cuda.get_device_name(index)})" for index in range(cuda)]
    return [*found, *(["mps"] if torch.backends.mps.is_available() else []), "cpu"]


def bf16_is_native(device: torch.device | None = None) -> bool:
    """Whether bf16 is worth offering on `device`, by the rule `--precision auto` follows: a CUDA GPU with bf16
    cores. Without a device, the GPU this process computes on (`resolve_runtime` made it current), and False
    when no CUDA work began: a CPU or MPS run, where tav's own choice is not bf16 either."""
    if device is None:
        if not torch.cuda.is_initialized():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type == "cuda" and _has_bf16_cores(device)


def _has_bf16_cores(device: torch.device) -> bool:
    """Whether the chosen GPU (not the current one) computes bf16 natively: compute capability 8.0 and later.

    `torch.cuda.is_bf16_supported()` also counts emulated bf16 (T4, V100, RTX 20xx), where it is slow
    and SDPA's fused kernels may refuse it, so attention would materialise whole score matrices.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of unmapping it (Linux only; a no-op elsewhere).

    Each UNet step allocates and frees tensors of tens of MB; by default glibc maps and unmaps
    them, and the page faults of touching fresh pages cost about 6% of a guided sampling step on a
    2-core CPU. Peak memory is unchanged; the process simply keeps its peak until it exits.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
