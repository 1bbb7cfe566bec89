"""What tav advises when a GPU run fails: a precision the card computes natively (bf16 only with bf16 cores,
as `--precision auto` decides), and an out-of-memory hint in the failing command's own options."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from tavcli.errors import TavError

from .conftest import CLIP, RunTav, one_job, tav_commands

T4, A100 = (7, 5), (8, 0)


def _gpus(monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]], started: bool = True) -> None:
    """Pretend this process computes on CUDA GPUs of these compute capabilities (GPU 0 current at first)."""
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.__setitem__(0, torch.device(device).index))
    capability = lambda index=None: capabilities[current[0] if index is None else index]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"GPU {index}")


def _fp16_advice(hint: str | None) -> str:
    """The precisions a hint offers after fp16 overflowed."""
    found = re.search(r"fp16 may have overflowed: try --precision ([a-z0-9 ]+)", hint or "")
    assert found, hint
    return found.group(1)


@pytest.mark.parametrize("capability, offered", [(T4, "fp32"), ((7, 0), "fp32"), (A100, "bf16 or fp32")])
def test_fp16_overflow_advice_offers_bf16_only_on_gpus_with_bf16_cores(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], offered: str
) -> None:
    from tavcli.method.training import TrainingRun, TuneDiverged
    from tavcli.workflow.remedies import naming_remedies, overflow_causes

    _gpus(monkeypatch, [capability])
    assert _fp16_advice(overflow_causes("fp16", None)) == offered
    assert overflow_causes("bf16", None) is None  # bf16 and fp32 share a range: nothing to offer
    with pytest.raises(TavError) as raised, naming_remedies(None):
        raise TuneDiverged("the loss is nan", 3, TrainingRun(steps=10), "fp16")
    assert _fp16_advice(raised.value.hint) == offered


def test_fp16_overflow_advice_asks_the_gpu_the_run_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.remedies import overflow_causes

    _gpus(monkeypatch, [A100, T4])  # an A100 current, beside a T4
    resolve_runtime("cuda:1", "fp16")
    assert _fp16_advice(overflow_causes("fp16", None)) == "fp32"
    resolve_runtime("cuda", "fp16")  # plain cuda: the GPU made current, still the T4
    assert _fp16_advice(overflow_causes("fp16", None)) == "fp32"
    resolve_runtime("cuda:0", "fp16")
    assert _fp16_advice(overflow_causes("fp16", None)) == "bf16 or fp32"


def test_fp16_overflow_advice_off_cuda_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from tavcli.workflow.remedies import overflow_causes

    _gpus(monkeypatch, [A100], started=False)  # a CPU (or MPS) run: CUDA never started, whatever the machine has
    assert _fp16_advice(overflow_causes("fp16", None)) == "fp32"


def test_a_stored_result_that_overflowed_is_never_advised_bf16_blindly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store knows no device: its own advice for fp16 is fp32, which helps on every device."""
    from tavcli.store.project import Project

    _gpus(monkeypatch, [T4])
    entry = Project(tmp_path).entry("inversions", {"steps": 2})
    with pytest.raises(TavError) as raised:
        entry.save({"trajectory": torch.tensor([float("nan")])}, {})
    assert raised.value.hint is not None and "fp32" in raised.value.hint and "bf16" not in raised.value.hint
    assert not entry.path.exists()


@pytest.mark.parametrize("capability, half", [(T4, "fp16"), (A100, "bf16")])
def test_the_pre_flight_offers_the_half_precision_the_gpu_computes(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], half: str
) -> None:
    """An fp32 tune that fits in half precision is told the half the card has cores for (both store 2 bytes)."""
    from tavcli.method.memory import MemoryEstimate, TuneWontFit
    from tavcli.workflow.remedies import settings_that_fit

    _gpus(monkeypatch, [capability])
    estimate = MemoryEstimate(2**33, 2**33, 2**34, 24, 512, 512, False, "fp32")
    with pytest.raises(TavError) as raised, settings_that_fit():
        raise TuneWontFit(estimate, 2**34, [{"checkpointing": True}, {"precision": "bf16"}])
    assert raised.value.hint == f"try --gradient-checkpointing or --precision {half}"


def _options(command: str) -> set[str]:
    """The long options `tav COMMAND --help` lists."""
    params = tav_commands()[command].params
    return {opt for param in params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


def _named_options(hint: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", hint))


@pytest.mark.parametrize("command", sorted(tav_commands()))
@pytest.mark.parametrize("capability, half", [(T4, "fp16"), (A100, "bf16")])
def test_the_out_of_memory_hint_names_only_the_commands_own_options(
    monkeypatch: pytest.MonkeyPatch, command: str, capability: tuple[int, int], half: str
) -> None:
    from tavcli.cli import _memory_error

    _gpus(monkeypatch, [capability])
    error = _memory_error(command)
    assert error.message == "the device ran out of memory" and error.hint
    assert _named_options(error.hint) <= _options(command), error.hint
    if "--precision" in _options(command):
        assert f"--precision {half}" in error.hint and "--precision " + {"fp16": "bf16", "bf16": "fp16"}[half] not in (
            error.hint
        )
    expected = {
        "tune": {"--gradient-checkpointing", "--rank", "--frames", "--width", "--height", "--precision"},
        "invert": {"--window", "--frames", "--precision"},
        "edit": {"--window", "--batch-size", "--frames", "--precision"},
    }
    assert expected.get(command, set()) <= _named_options(error.hint)


@pytest.mark.parametrize("command", ["tune", "invert", "edit", "demo", "batch"])
def test_out_of_memory_in_each_command_is_one_line_in_its_own_options(
    tmp_path: Path, run_tav: RunTav, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> NoReturn:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _gpus(monkeypatch, [T4])
    monkeypatch.setattr("tavcli.cli.setup.session", out_of_memory)
    project = tmp_path / "p.tav"
    project.mkdir()
    jobs = one_job(tmp_path, project, ["a cat is skiing"])
    args: dict[str, list[str | Path]] = {
        "tune": ["tune", CLIP, "a man is skiing", "-m", "tiny", "-p", project],
        "invert": ["invert", "-p", project],
        "edit": ["edit", "a cat is skiing", "-p", project],
        "demo": ["demo", "-p", project],
        "batch": ["batch", jobs],
    }
    code, out, err = run_tav(*args[command])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: the device ran out of memory"), err
    assert _named_options(lines[0]) <= _options(command), lines[0]
    assert "bf16" not in lines[0]  # a T4 has no bf16 cores
