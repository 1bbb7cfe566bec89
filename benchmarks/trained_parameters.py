"""How many parameters a tune trains, per architecture: whole projections (the paper's rule) and low-rank adapters.

Counted on the meta device from the declared configs (`tavcli.models.architectures`): no weights are made or
downloaded, so it runs anywhere in seconds.

    python benchmarks/trained_parameters.py [--ranks 4 16 64]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from tavcli.method.low_rank import add_low_rank_adapters, low_rank_parameters
from tavcli.method.video_unet import inflate_unet, trainable_parameters
from tavcli.models.architectures import ARCHITECTURES, configs


def counts(name: str, ranks: list[int]) -> dict[str, float]:
    """Millions of parameters of architecture `name`: its UNet, the video UNet, what a whole tune trains (and
    of that the temporal layers), and what each `--rank` trains."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs(name)["unet"])
        image = sum(p.numel() for p in unet.parameters())
        video = inflate_unet(unet)
        trained = trainable_parameters(video)
        row = {
            "unet": image,
            "video unet": sum(p.numel() for p in video.parameters()),
            "trained": sum(p.numel() for p in trained.values()),
            "of which temporal": sum(p.numel() for n, p in trained.items() if ".attn_temp." in n or ".norm_temp." in n),
        }
        for rank in ranks:
            adapted = inflate_unet(UNet2DConditionModel.from_config(configs(name)["unet"]))
            add_low_rank_adapters(adapted, rank)
            row[f"--rank {rank}"] = sum(p.numel() for p in low_rank_parameters(adapted).values())
    return {column: value / 1e6 for column, value in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 16, 64])
    ranks = parser.parse_args().ranks
    rows = {name: counts(name, ranks) for name in ARCHITECTURES}
    columns = list(next(iter(rows.values())))
    print("| architecture | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[column]:,.1f}M" for column in columns) + " |")


if __name__ == "__main__":
    main()
