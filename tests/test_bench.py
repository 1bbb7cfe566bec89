"""The benchmark measures what it says: one model load per phase, `tav tune`'s offloading, the right
peak FLOP/s for the device, and a 2D baseline run like the video UNet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/bench.py as a module."""
    module: ModuleType = load_benchmark("bench")
    return module


def phase_args(workdir: Path, phase: str, **changes: Any) -> argparse.Namespace:
    """What `bench.py --config tiny --phase PHASE` parses to, at the smallest sizes that still run."""
    values: dict[str, Any] = {
        "config": "tiny",
        "device": "cpu",
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "frames": 2,
        "size": 64,
        "warmup": 0,
        "repeats": 1,
        "edit_steps": 1,
        "window": None,
        "compile": False,
        "workdir": workdir,
        "contention": False,
        "tune_steps": 1,
        "phase": phase,
    }
    return argparse.Namespace(**{**values, **changes})


def count_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of tavcli's model loader in this process, whichever module calls it."""
    import tavcli.models.loading
    import tavcli.workflow.session

    loads: list[str] = []
    original = tavcli.models.loading.load_components

    def counting(source: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(str(source.name))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(tavcli.models.loading, "load_components", counting)
    monkeypatch.setattr(tavcli.workflow.session, "load_components", counting)
    return loads


def test_the_edit_phase_loads_the_model_once(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = count_model_loads(monkeypatch)
    found = bench.run_phase(phase_args(tmp_path, "edit"))
    assert found["edit_per_prompt_s"] > 0
    assert len(loads) == 1, loads  # before: the phase's own copy, then the session's (3.4 GB more at SD 1.5)


def test_the_tune_phase_offloads_the_frozen_models_before_training_as_tav_tune_does(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tavcli.method.training
    from tavcli.workflow.session import Session

    loads = count_model_loads(monkeypatch)
    events: list[str] = []
    offload, train = Session.offload_frozen, tavcli.method.training.train_delta

    def offloading(self: Session, name: str) -> None:
        events.append("offload")
        offload(self, name)

    def training(*args: Any, **kwargs: Any) -> Any:
        events.append("train")
        return train(*args, **kwargs)

    monkeypatch.setattr(Session, "offload_frozen", offloading)
    monkeypatch.setattr(tavcli.method.training, "train_delta", training)
    found = bench.run_phase(phase_args(tmp_path, "tune"))
    assert found["tune_step_s"] > 0
    assert events == ["offload", "train"]  # on a GPU the VAE and text encoder wait on the CPU, as in `tav tune`
    assert len(loads) == 1


@pytest.mark.parametrize(
    ("name", "precision", "row", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989e12),  # what the SXM part calls itself
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835e12),
        ("NVIDIA H200", "bf16", "H200 SXM", 989e12),
        ("NVIDIA H200 NVL", "bf16", "H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312e12),
        ("NVIDIA A100 80GB PCIe", "fp16", "A100", 312e12),
        ("NVIDIA RTX A1000", "bf16", None, None),  # not an A100
        ("NVIDIA RTX A1000 6GB Laptop GPU", "fp16", None, None),
        ("NVIDIA GeForce RTX 4090", "bf16", "RTX 4090", 165.2e12),
        ("NVIDIA GeForce RTX 4090 D", "bf16", None, None),  # fewer cores than the 4090
        ("NVIDIA L40S", "bf16", "L40S", 362e12),
        ("NVIDIA L40", "bf16", None, None),
    ],
)
def test_peak_flops_are_looked_up_by_the_precise_device_name(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str, precision: str, row: str | None, peak: float | None
) -> None:
    from tavcli.runtime import Runtime

    runtime = Runtime(torch.device("cuda", 0), precision)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    report = bench._flop_report("tune_step_s", 2e12, 0.01, runtime)  # 200 TFLOP/s achieved
    assert report["tune_step_tflops"] == 200.0
    if peak is None:  # no row: no fraction, rather than another GPU's
        assert report["tune_step_peak_fraction"] is None
        assert bench._environment(runtime)["peak"] is None
        return
    assert report["tune_step_peak_fraction"] == round(200e12 / peak, 3)
    assert bench._environment(runtime)["peak"] == {"row": row, "arithmetic": precision, "tflops": round(peak / 1e12, 1)}


@pytest.mark.parametrize(
    ("matmul_precision", "cudnn_tf32", "arithmetic", "peak"),
    [
        ("highest", False, "fp32", 19.5e12),  # no TF32 anywhere: the plain fp32 peak
        ("high", False, "tf32", 156e12),  # matrix products on TF32 tensor cores
        ("highest", True, "tf32", 156e12),  # cuDNN's default: convolutions on TF32 tensor cores
    ],
)
def test_fp32_figures_use_the_tf32_peak_when_tf32_is_on(
    bench: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    matmul_precision: str,
    cudnn_tf32: bool,
    arithmetic: str,
    peak: float,
) -> None:
    from tavcli.runtime import Runtime

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)  # also sets torch.backends.cuda.matmul.allow_tf32
    try:
        runtime = Runtime(torch.device("cuda", 0), "fp32")
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
        report = bench._flop_report("sampling_step_s", 1e12, 0.1, runtime)  # 10 TFLOP/s
        assert report["sampling_step_peak_fraction"] == round(10e12 / peak, 3)
        assert bench._environment(runtime)["peak"] == {
            "row": "A100",
            "arithmetic": arithmetic,
            "tflops": round(peak / 1e12, 1),
        }
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_2d_baseline_runs_through_the_same_runtime_as_the_video_unet(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[torch.nn.Module] = []
    optimizers: list[dict[str, Any]] = []
    loss_reads: list[int] = []

    def compile_(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        compiled.append(module)
        return module  # what `--compile` would call, without compiling (minutes on a CPU)

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            optimizers.append(dict(self.defaults))

    item = torch.Tensor.item

    def reading(tensor: torch.Tensor) -> Any:
        if tensor.grad_fn is not None:  # a training loss, not an optimizer's step count
            loss_reads.append(1)
        return item(tensor)

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(torch.Tensor, "item", reading)
    bench.run_phase(phase_args(tmp_path, "tune", compile=True))
    assert len(optimizers) == 1 and len(loss_reads) == 1  # the video UNet's tune: train_delta
    tune_optimizer = optimizers.pop()
    compiled.clear()
    loss_reads.clear()

    found = bench.run_phase(phase_args(tmp_path, "unet2d", compile=True))
    assert {"unet2d_tune_step_s", "unet2d_inversion_step_s", "unet2d_sampling_step_s"} <= set(found)
    assert len(compiled) >= 2  # training and inference alike, as `--compile` does for the video UNet
    assert {type(module).__name__ for module in compiled} == {"UNet2DConditionModel"}
    assert optimizers == [tune_optimizer]  # AdamW configured as train_delta's (fused on a GPU)
    assert len(loss_reads) == 1  # the loss read once per step, as train_delta does for progress and divergence


@pytest.mark.parametrize("phase", ["sampling_fusion", "sampling_branch"])
def test_the_attention_control_phases_run_and_report_their_ratios(
    bench: ModuleType, tmp_path: Path, phase: str
) -> None:
    found = bench.run_phase(phase_args(tmp_path, phase, repeats=2))
    assert found[f"{phase}_step_s"] > 0 and found[f"{phase}_peak_memory_gb"] > 0
    plain = {"sampling_step_s": found[f"{phase}_step_s"] / 2, "sampling_peak_memory_gb": 1.0, "environment": {}}
    summary = bench.summarise(phase_args(tmp_path, phase), {"sampling": plain, phase: found})
    assert summary["attention_control_ratio_to_sampling"][phase]["step"] == 2.0  # the ratio of the two


def test_fatezero_stored_maps_are_counted_as_its_own_table_gives_them(bench: ModuleType) -> None:
    # FateZero's table: 15 GB of maps for 10 inversion steps of 8 frames at 512x512 (SD 1.5, fp16).
    assert round(bench.fatezero_bytes("sd15", 8, 512, 10) / 1e9) == 15
    assert bench.fatezero_bytes("sd15", 24, 512, 50) == 15 * bench.fatezero_bytes("sd15", 8, 512, 10)


def test_compile_figures_are_compiled_ones_the_flop_count_runs_on_the_eager_module(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **_: compile_(module, backend="eager"))  # no inductor wait
    monkeypatch.setattr(bench, "_counts_flops", lambda runtime: True)  # count on the CPU as on a GPU
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    found = bench.run_phase(phase_args(tmp_path, "sampling", compile=True))
    assert found["sampling_step_s"] > 0
    # Before: the FLOP count called the compiled UNet first, under a counting mode, and the compiler then
    # skipped it for good: 0 graphs, and "compile" figures that were eager ones.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()


@pytest.mark.parametrize("phase", ["tune_checkpointing", "sampling", "inversion"])
def test_a_phase_peak_is_read_before_the_flop_count_step_runs(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    events: list[str] = []
    count = bench._flops

    def counting(runtime: Any, step: Any) -> Any:
        events.append("flops")
        return count(runtime, step)

    def peaks(runtime: Any, phase: str) -> dict[str, float]:
        events.append("peak")
        return {f"{phase}_peak_memory_gb": 1.0, f"{phase}_peak_reserved_gb": 2.0}

    monkeypatch.setattr(bench, "_counts_flops", lambda runtime: True)
    monkeypatch.setattr(bench, "_flops", counting)
    monkeypatch.setattr(bench, "_peaks", peaks)
    found = bench.run_phase(phase_args(tmp_path, phase))
    # Before: the count's step (for tune_checkpointing a plain, uncheckpointed one) ran first and was the peak.
    assert events[:2] == ["peak", "flops"], events
    assert found[f"{phase}_peak_memory_gb"] == 1.0 and found[f"{phase}_peak_reserved_gb"] == 2.0


def test_each_phase_result_is_written_as_it_finishes_and_a_failed_phase_costs_only_its_figure(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess

    out = tmp_path / "bench.json"
    seen: list[dict[str, Any]] = []
    calls: list[str] = []

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        phase = command[command.index("--phase") + 1]
        calls.append(phase)
        seen.append(json.loads(out.read_text()) if out.exists() else {})
        if phase == "inversion":
            return subprocess.CompletedProcess(
                command, 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"
            )
        figure = {f"{phase}_step_s": 0.5, "environment": {"device_name": "test"}}
        return subprocess.CompletedProcess(command, 0, json.dumps(figure) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "build_model", lambda config, folder: folder)
    argv = ["bench.py", "--config", "tiny", "--phases", "tune,inversion,sampling", "--workdir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    with pytest.raises(SystemExit, match="1 of 3 phases failed: inversion"):
        bench.main()
    assert calls == ["tune", "inversion", "sampling"]  # before: the first failure ended the run
    assert seen[1]["tune_step_s"] == 0.5  # before: nothing on disk until the last phase had finished
    report = json.loads(out.read_text())
    assert report["tune_step_s"] == report["sampling_step_s"] == 0.5
    assert report["failed"] == {"inversion": "torch.OutOfMemoryError: CUDA out of memory"}


@pytest.mark.parametrize("phase", ["sampling", "unet2d"])
def test_sdxl_phases_give_the_unets_the_clip_size_numbers_and_the_2d_baseline_the_packed_text(
    bench: ModuleType, tmp_path_factory: pytest.TempPathFactory, phase: str
) -> None:
    from diffusers import UNet2DConditionModel

    workdir = tmp_path_factory.getbasetemp() / "bench-sdxl-narrow"  # one narrow SDXL folder for both phases
    found = bench.run_phase(phase_args(workdir, phase, config="sdxl-narrow"))
    # Before: the video UNet had no size numbers and the 2D UNet took the pooled row for a 78th token: both failed.
    assert found["sampling_step_s" if phase == "sampling" else "unet2d_sampling_step_s"] > 0
    config = UNet2DConditionModel.load_config(bench.build_model("sdxl-narrow", workdir / "models") / "unet")
    assert config["block_out_channels"] == [40, 80, 160]  # narrow, as the CPU smoke needs
    sdxl = argparse.Namespace(config=argparse.Namespace(**config))
    assert bench.time_ids(sdxl, 64).tolist() == [64, 64, 0, 0, 64, 64]  # the whole frame, nothing cropped
    assert bench.time_ids(argparse.Namespace(config=argparse.Namespace(addition_embed_type=None)), 64) is None


def test_the_sdxl_config_is_what_tav_tune_gives_sdxl_by_default(bench: ModuleType) -> None:
    from tavcli.settings.options import MODEL_DEFAULTS, TUNE

    defaults = {name: MODEL_DEFAULTS["sdxl"].get(name, TUNE[name].default) for name in ("frames", "width", "height")}
    assert bench.CONFIGS["sdxl"]["frames"] == defaults["frames"]  # the GPU check's SDXL steps take the defaults
    assert bench.CONFIGS["sdxl"]["size"] == defaults["width"] == defaults["height"]
    assert bench.CONFIGS["sdxl-narrow"]["narrow"] and not bench.CONFIGS["sdxl"].get("narrow")
