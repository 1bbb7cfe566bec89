"""Clip metrics of the paper and the LOVEU-TGVE benchmark, from CLIP embeddings (`tav eval`).

- **frame consistency**: the mean cosine similarity between the CLIP image embeddings of every
  pair of distinct frames (1.0: all frames embed alike);
- **text faithfulness** (CLIP score): the mean cosine similarity between each frame's image
  embedding and the prompt's text embedding.

Both are reported as cosine similarities in [-1, 1]; the paper's tables show them x100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from tavcli.errors import TavError, first_line
from tavcli.models.hub import local_folder, local_only, unreachable
from tavcli.models.source import quiet_libraries

__all__ = ["ClipScorer", "Scores"]


@dataclass(frozen=True)
class Scores:
    frame_consistency: float
    text_faithfulness: float
    frames: int

    def record(self) -> dict[str, float | int]:
        return {
            "frame_consistency": round(self.frame_consistency, 5),
            "text_faithfulness": round(self.text_faithfulness, 5),
            "frames": self.frames,
        }


class ClipScorer:
    """A CLIP model (hub id or local folder) that scores clips against prompts."""

    def __init__(self, name: str, device: torch.device) -> None:
        quiet_libraries()
        folder = local_folder(name, "CLIP model", "--clip-model")
        offline = folder is None and local_only()
        source = name if folder is None else str(folder)
        try:
            model = CLIPModel.from_pretrained(source, use_safetensors=True, local_files_only=offline)
            self.model = model.to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
            self.tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=offline)
        except (OSError, ValueError) as error:
            if offline:
                raise unreachable(name, "give a local CLIP folder with --clip-model") from None
            raise TavError(
                f"cannot load the CLIP model {name!r}: {first_line(error)}",
                "give a local CLIP folder with --clip-model (the hub may be unreachable)",
            ) from None
        self.name = name
        self.device = device

    def to(self, device: torch.device) -> ClipScorer:
        """Move the model (loaded early on the CPU to check it is there, scored with on the run's device)."""
        self.model.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def score(self, frames: np.ndarray, prompt: str) -> Scores:
        """Frame consistency and text faithfulness of uint8 frames (f, h, w, 3) for `prompt`."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values.to(self.device)
        images = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt")
        text = _features(self.model.get_text_features(input_ids=tokens.input_ids.to(self.device)))
        text = F.normalize(text.float(), dim=-1)
        count = len(images)
        similarity = images @ images.T
        pairs = (similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)) if count > 1 else 1.0
        return Scores(float(pairs), float((images @ text.T).mean()), count)


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 wraps them as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]
