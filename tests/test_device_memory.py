"""What a run holds on its device: one tuned UNet at a time, CLIP only while it scores, and a pre-flight that
counts only what a tune can have (free memory, torch's unused cache, the UNet already there)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch

from .conftest import CLIP

if TYPE_CHECKING:
    from tavcli.method.metrics import ClipScorer
    from tavcli.method.video_unet import VideoUNet
    from tavcli.workflow.session import Session


def _session() -> Session:
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.session import Session

    return Session(resolve_runtime("cpu", "fp32"))


class _Scorer:
    """Stands in for a CLIP scorer: where it is when it scores, and where it ends."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.moves: list[str] = []

    def to(self, device: torch.device) -> _Scorer:
        self.moves.append(str(device))
        self.device = device
        return self


@pytest.mark.slow
def test_a_preview_tune_and_a_batch_hold_one_tuned_unet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tavcli.settings.tuning import FrameSelection, FrameSize, Preview, TuneRequest, TuneSettings
    from tavcli.workflow import tuning
    from tavcli.workflow.session import Session

    monkeypatch.setattr("tavcli.workflow.rendering.evaluate_output", lambda scorer, path: {})
    held: list[int] = []  # how many tuned UNets the session holds after each one it hands out
    tuned_unet = Session.tuned_unet

    def counted(self: Session, *args: Any) -> object:
        built = tuned_unet(self, *args)
        held.append(len(self._tuned))
        return built

    monkeypatch.setattr(Session, "tuned_unet", counted)
    session, scorer = _session(), _Scorer()
    request = TuneRequest(
        clip=CLIP, prompt="a man is skiing", project=tmp_path / "p.tav", model="tiny",
        selection=FrameSelection(frames=2), size=FrameSize(width=32, height=32), settings=TuneSettings(steps=3),
    )  # fmt: skip
    made = tuning.tune(
        session, request, preview=Preview(prompt="a dog", every=1, steps=1), scorer=cast("ClipScorer", scorer)
    )
    assert [a.details["step"] for a in made if a.kind == "edit"] == [1, 2, 3]
    assert len(held) >= 3 and max(held) == 1  # three kept states were edited, one UNet held at a time
    assert scorer.moves == ["cpu", "cpu"] * 3 and scorer.device.type == "cpu"  # to the run's device and back

    from tavcli.batch.jobs import parse_jobs, read_jobs
    from tavcli.batch.running import run_jobs

    jobs_file = tmp_path / "jobs.jsonl"
    small = '"model": "tiny", "frames": 2, "width": 32, "height": 32, "edit": {"steps": 1}'
    jobs_file.write_text(
        "\n".join(
            f'{{"clip": "{CLIP}", "prompt": "a man", "steps": {steps}, "edits": ["a cat"], {small}, '
            f'"project": "{tmp_path / "b.tav"}"}}'
            for steps in (1, 2)
        )
    )
    held.clear()
    jobs, problems = parse_jobs(*read_jobs(str(jobs_file)))
    assert not problems and run_jobs(_session(), jobs, True, lambda record: None)
    assert len(held) >= 2 and max(held) == 1  # two jobs' tunes on one model


def test_the_pre_flight_counts_free_and_cached_memory_and_the_unet_not_all_this_process_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tavcli.workflow.tune_planning import _available

    unet = torch.nn.Linear(10, 10)  # 440 bytes of weights, on the device in question
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000_000, 8_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 500_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 300_000)  # a CLIP model, a cached UNet...
    assert _available(cast("VideoUNet", unet), torch.device("cpu")) == 1_000_000 + 200_000 + 440


class _Weight:
    """What the pre-flight reads of a parameter, on a GPU this machine need not have."""

    def __init__(self, device: torch.device, nbytes: int, address: int) -> None:
        self.device, self.nbytes, self.address = device, nbytes, address

    def data_ptr(self) -> int:
        return self.address

    def numel(self) -> int:
        return self.nbytes // 2

    def element_size(self) -> int:
        return 2


def test_the_pre_flight_counts_the_unet_on_the_gpu_that_plain_cuda_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--device cuda` (and auto) gave an index-less `cuda`, unequal to the weights' `cuda:0`: the weights already
    on the card were not counted, and tunes that fit were refused."""
    from tavcli.runtime import resolve_runtime
    from tavcli.workflow.tune_planning import _available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "GPU 0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000_000, 8_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 500_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 300_000)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    weights = [_Weight(gpu, 1000, 1), _Weight(gpu, 2000, 2), _Weight(gpu, 2000, 2), _Weight(cpu, 4000, 3)]
    unet = type("UNet", (), {"parameters": lambda self: iter(weights)})()  # tied weights counted once
    for device in ("cuda", "auto", "cuda:0"):
        runtime = resolve_runtime(device, "fp32")
        assert _available(cast("VideoUNet", unet), runtime.device) == 1_000_000 + 200_000 + 3000, device
