"""What model code shares: where a model is (`ModelSource`), its loaded parts (`Components`), and quiet
libraries. Free of torch at import: the parts' types are annotations here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing them would load torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["Components", "ModelSource", "quiet_libraries"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and what identifies them (for cache keys and sidecars)."""

    name: str  # the model's name (tavcli.models.names): base, revision and variant loaded, configs, LoRAs
    folder: Path
    revision: str  # hub commit, or a content hash of a local folder's weights (and of its LoRAs)
    loras: tuple[tuple[Path, float], ...] = ()  # fused into the base weights when loaded, in order
    vae: Path | None = None  # a diffusers VAE folder loaded instead of the model's own (`--vae`)

    @property
    def identity(self) -> dict[str, str]:
        return {"model": self.name, "revision": self.revision}

    @property
    def identity_key(self) -> tuple[str, str]:
        """What tells loaded weights apart: the name (with its variant and LoRAs) and the revision."""
        return self.name, self.revision


@dataclass
class Components:
    """The loaded parts of a Stable Diffusion model (the UNet still 2D); SDXL's second tokenizer and text encoder
    where the model has them, and whether it conditions the empty prompt on zeros (SDXL's
    `force_zeros_for_empty_prompt`)."""

    source: ModelSource
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    zero_empty_prompt: bool = False

    @property
    def text_encoders(self) -> list[CLIPTextModel | CLIPTextModelWithProjection]:
        return [self.text_encoder] if self.text_encoder_2 is None else [self.text_encoder, self.text_encoder_2]


def quiet_libraries() -> None:
    """tavcli draws its own progress and reports load failures itself: silence the libraries' bars and logs."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity(logging.CRITICAL)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
