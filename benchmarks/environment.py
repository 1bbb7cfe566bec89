"""The GPU check's first step: what the machine is and which attention kernels really run, as JSON.

    python benchmarks/environment.py RESULT.json [bf16|fp16|fp32]

The device (name, memory, driver, compute capability), the versions of the libraries tavcli calls (a borrowed
machine's own may differ from CI's), the SDPA backends enabled, and the CUDA kernels one
`F.scaled_dot_product_attention` call of each of SD 1.5's attention shapes at 24 frames of 512x512 launches
(profiled: an enabled backend may still be passed over for a shape or a precision).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "diffusers", "transformers", "typer", "click", "accelerate", "av", "peft", "safetensors")
# (batch, heads, queries, keys, head width) of SD 1.5's widest attention at 24 frames of 512x512 (64x64 latents).
SHAPES = {
    "sparse_causal_self": (24, 8, 4096, 8192, 40),  # each frame's queries, its own and the first frame's keys
    "temporal": (4096, 8, 24, 24, 40),  # each position's 24 frames
    "cross": (24, 8, 4096, 77, 40),  # the prompt's 77 tokens
}


def main() -> None:
    result, precision = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "bf16"
    import torch

    found: dict[str, Any] = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        found["device"] = torch.cuda.get_device_name(0)
        found["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        found["torch_cuda"] = torch.version.cuda
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        found["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        backends = torch.backends.cuda
        found["sdpa_enabled"] = {
            "flash": backends.flash_sdp_enabled(),
            "mem_efficient": backends.mem_efficient_sdp_enabled(),
            "cudnn": getattr(backends, "cudnn_sdp_enabled", lambda: None)(),
            "math": backends.math_sdp_enabled(),
        }
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        found["sdpa_kernels"] = {name: sdpa_kernels(shape, dtype) for name, shape in SHAPES.items()}
        found["sdpa_precision"] = precision
    else:
        found["device"] = "cpu"
        found["cpu_count"] = os.cpu_count()
    temp = result.with_suffix(".tmp")
    temp.write_text(json.dumps(found, indent=2) + "\n")
    os.replace(temp, result)


def sdpa_kernels(shape: tuple[int, int, int, int, int], dtype: Any) -> list[str]:
    """The CUDA kernels one SDPA call of `shape` launches (after a warm-up call), by name."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    batch, heads, queries, keys, width = shape
    q = torch.randn(batch, heads, queries, width, device="cuda", dtype=dtype)
    k = torch.randn(batch, heads, keys, width, device="cuda", dtype=dtype)
    F.scaled_dot_product_attention(q, k, k)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        F.scaled_dot_product_attention(q, k, k)
        torch.cuda.synchronize()
    timed = [e for e in profiled.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    return [e.key[:120] for e in sorted(timed, key=lambda e: -e.self_device_time_total)]


if __name__ == "__main__":
    main()
