"""Where and in what precision the work runs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from tavcli.errors import TavError
from tavcli.options import Precision

__all__ = ["DTYPES", "Runtime", "resolve_runtime"]

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

    def autocast(self) -> AbstractContextManager[object]:
        """Mixed precision for UNet calls: float32 weights, `dtype` matrix products."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_runtime(device: str = "auto", precision: Precision | str = "auto", compile: bool = False) -> Runtime:
    """`--device auto` picks CUDA, then Apple MPS, then the CPU.

    `--precision auto` is bf16 on CUDA GPUs that support it (Ampere and later: fp32's range, so no
    overflow), fp16 on older ones, fp32 elsewhere. fp16 and bf16 also run on a CPU (autocast).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise TavError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise TavError(f"--device {device}: no CUDA GPU is available here", "use --device cpu")
    if precision == "auto":
        precision = "fp32" if chosen.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in DTYPES:
        raise TavError(f"unknown precision {precision!r}", "use auto, fp32, fp16 or bf16")
    if precision != "fp32":
        # What `upcast_attention` (SD 2.x) asks for: attention scores and softmax in fp32. SDPA does
        # that for half inputs on every backend, its math fallback too unless this flag allows half.
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    if chosen.type == "cpu":
        keep_freed_memory()
    return Runtime(device=chosen, precision=precision, compile=compile)


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
