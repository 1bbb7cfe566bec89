"""The real Stable Diffusion architectures (SD 1.5, SD 2.1 base, SD 2.1 768-v, SDXL base 1.0), declared once.

No model hub is reachable from tests and CI, yet tavcli must work on the real models: their
per-block head counts, linear or convolutional projections, attention upcasting, 1024-wide
OpenCLIP text, v-prediction and SDXL's two text encoders, size conditioning and deep transformer blocks all
change the code paths taken. This module declares each
architecture's configs and builds diffusers folders of them with seeded random weights, at full
size (benchmarks) or *narrow*: fewer channels and text layers, every structural choice kept.

Torch-free at import: torch, diffusers and transformers load only when a model is built.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from tavcli.errors import TavError
from tavcli.files.atomic import atomic_path
from tavcli.models.source import quiet_libraries

__all__ = ["ARCHITECTURES", "build_model", "configs", "save_random_model"]

Configs = dict[str, dict[str, Any]]  # part (unet, vae, text_encoder, scheduler) -> its config
SEED = 0
TINY_CONFIGS = resources.files("tavcli") / "tiny"  # the built-in model's configs and tokenizer

_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
_CLIP_TEXT = {"max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5}
_SD15_TEXT = _CLIP_TEXT | {  # OpenAI CLIP ViT-L/14
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_SD2_TEXT = _CLIP_TEXT | {  # OpenCLIP ViT-H/14 (SD 2.x uses 23 of its 24 layers) as a CLIPTextModel
    "hidden_size": 1024,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_SD2_UNET = _SD_UNET | {
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' SD 2 configs: heads per block (64 channels each)
    "use_linear_projection": True,
}

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): three levels, the first without attention; 1, 2 and
# 10 transformer blocks per attention; the two encoders' penultimate states concatenated (768 + 1280 = 2048)
# as text; the second's pooled projection (1280) and six size numbers (6 x 256) as the added "text_time" input.
_SDXL_UNET = _SD_UNET | {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],  # diffusers' SDXL config: heads per block (64 channels each)
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 x 256 size numbers + the 1280-wide pooled text
    "sample_size": 128,
}
_SDXL_TEXT_2 = _CLIP_TEXT | {  # OpenCLIP ViT-bigG/14 as a CLIPTextModelWithProjection
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

ARCHITECTURES: dict[str, Configs] = {
    "sd15": {
        "unet": _SD_UNET
        | {
            "cross_attention_dim": 768,
            "attention_head_dim": 8,  # diffusers' SD 1 configs: 8 heads in every block
            "use_linear_projection": False,
            "upcast_attention": False,
            "sample_size": 64,
        },
        "vae": _SD_VAE,
        "text_encoder": _SD15_TEXT,
        "scheduler": _SD_SCHEDULER,
    },
    "sd21-base": {
        "unet": _SD2_UNET | {"upcast_attention": False, "sample_size": 64},
        "vae": _SD_VAE,
        "text_encoder": _SD2_TEXT,
        "scheduler": _SD_SCHEDULER,
    },
    "sd21-v": {
        "unet": _SD2_UNET | {"upcast_attention": True, "sample_size": 96},
        "vae": _SD_VAE | {"sample_size": 768},
        "text_encoder": _SD2_TEXT,
        "scheduler": _SD_SCHEDULER | {"prediction_type": "v_prediction"},
    },
    "sdxl": {
        "unet": _SDXL_UNET,
        "vae": _SD_VAE | {"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024},
        "text_encoder": _SD15_TEXT,
        "text_encoder_2": _SDXL_TEXT_2,
        "scheduler": _SD_SCHEDULER | {"timestep_spacing": "leading"},
    },
}
# Narrow: a tenth of SD's widths (SD 2.x's rounded so its 5/10/20 heads keep one head size), 2 text layers.
_NARROW_UNET = {
    "sd15": [32, 64, 128, 128],
    "sd21-base": [40, 80, 160, 160],
    "sd21-v": [40, 80, 160, 160],
    "sdxl": [40, 80, 160],
}
# SDXL's text widths narrowed too (its encoders are 123M and 695M parameters), and what depends on them.
_NARROW_SDXL_TEXT = {"text_encoder": 32, "text_encoder_2": 64}
_NARROW_VAE = [32, 64, 128, 128]
_NARROW_TEXT_LAYERS = 2


def configs(name: str, narrow: bool = False, changes: Mapping[str, Mapping[str, Any]] | None = None) -> Configs:
    """The configs of architecture `name` (full size, or narrow), with `changes` merged into each part."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: one of {', '.join(ARCHITECTURES)}")
    parts = {part: dict(config) for part, config in ARCHITECTURES[name].items()}
    if narrow:
        parts["unet"] |= _narrowed(parts["unet"], _NARROW_UNET[name])
        parts["vae"] |= _narrowed(parts["vae"], _NARROW_VAE)
        for part in ("text_encoder", "text_encoder_2"):
            if part in parts:
                parts[part]["num_hidden_layers"] = _NARROW_TEXT_LAYERS
        if name == "sdxl":
            parts |= _narrow_sdxl_text(parts)
    for part, change in (changes or {}).items():
        parts[part] |= change
    _check(parts["unet"])
    return parts


def _narrow_sdxl_text(parts: Configs) -> Configs:
    """SDXL's encoders at the narrow widths, with the UNet's text width (their sum) and added input (the size
    numbers' embeddings and the second encoder's projection) to match."""
    text = {
        part: parts[part] | {"hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": 4}
        for part, width in _NARROW_SDXL_TEXT.items()
    }
    projection = _NARROW_SDXL_TEXT["text_encoder_2"]
    text["text_encoder"]["projection_dim"] = _NARROW_SDXL_TEXT["text_encoder"]
    text["text_encoder_2"]["projection_dim"] = projection
    time_embed = 8
    unet = parts["unet"] | {
        "cross_attention_dim": sum(_NARROW_SDXL_TEXT.values()),
        "addition_time_embed_dim": time_embed,
        "projection_class_embeddings_input_dim": 6 * time_embed + projection,
    }
    return {**text, "unet": unet}


def _narrowed(config: dict[str, Any], widths: list[int]) -> dict[str, Any]:
    """New block widths, with the most norm groups (up to the full model's) that divide every width."""
    common = math.gcd(*widths)
    groups = max(g for g in range(1, config["norm_num_groups"] + 1) if common % g == 0)
    return {"block_out_channels": widths, "norm_num_groups": groups}


def _check(unet: dict[str, Any]) -> None:
    """Every block's width must split into its heads and norm groups, or diffusers fails late and obscurely."""
    widths, heads = unet["block_out_channels"], unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(widths)
    for width, count in zip(widths, heads, strict=True):
        if width % count or width % unet["norm_num_groups"]:
            raise ValueError(f"a block of width {width} cannot have {count} heads and {unet['norm_num_groups']} groups")


def build_model(
    name: str, folder: Path, narrow: bool = False, changes: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """Write a diffusers Stable Diffusion folder of architecture `name` with seeded random weights.

    The tokenizer is the built-in tiny model's (its ids fit every vocabulary). The folder is written
    atomically, model_index.json last, and is built once: a complete folder is returned as it is.
    It also serves as `--model-config` for single-file checkpoints of the same architecture.
    """
    if (folder / "model_index.json").is_file():
        return folder
    parts = configs(name, narrow, changes)
    tokens = json.loads((TINY_CONFIGS / "text_encoder.json").read_text())
    special = {key: tokens[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for part in ("text_encoder", "text_encoder_2"):
        if part in parts:
            parts[part] = special | parts[part]
    with atomic_path(folder) as temp:
        save_random_model(temp, parts)
    return folder


def save_random_model(folder: Path, parts: Configs, seed: int = SEED) -> None:
    """Save a Stable Diffusion model of these configs with weights drawn after `torch.manual_seed(seed)`
    (deterministic), the tiny model's tokenizer, and model_index.json last: it marks a complete model."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    quiet_libraries()
    weighted = ["unet", "vae", "text_encoder", *(["text_encoder_2"] if "text_encoder_2" in parts else [])]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**parts["unet"]).save_pretrained(folder / "unet")
        AutoencoderKL(**parts["vae"]).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(**parts["text_encoder"])).save_pretrained(folder / "text_encoder")
        if "text_encoder_2" in parts:  # SDXL's second encoder, with its projection of the pooled state
            config = CLIPTextConfig(**parts["text_encoder_2"])
            CLIPTextModelWithProjection(config).save_pretrained(folder / "text_encoder_2")
    DDIMScheduler(**parts["scheduler"]).save_pretrained(folder / "scheduler")
    # A signal caught inside a library's save can leave a part without weights; never mark such a model complete.
    unsaved = [part for part in weighted if not any((folder / part).glob("*.safetensors"))]
    if unsaved:
        raise TavError(f"building the model in {folder} left {', '.join(unsaved)} without weights", "run it again")
    tokenizers = ["tokenizer", *(["tokenizer_2"] if "text_encoder_2" in parts else [])]
    for tokenizer in tokenizers:
        (folder / tokenizer).mkdir()
        for file in (TINY_CONFIGS / "tokenizer").iterdir():
            shutil.copyfile(str(file), folder / tokenizer / file.name)
    if "text_encoder_2" not in parts:
        shutil.copyfile(str(TINY_CONFIGS / "model_index.json"), folder / "model_index.json")
        return
    index = json.loads((TINY_CONFIGS / "model_index.json").read_text())  # as StableDiffusionXLPipeline saves it
    index = {key: value for key, value in index.items() if key not in ("safety_checker", "requires_safety_checker")}
    index |= {
        "_class_name": "StableDiffusionXLPipeline",
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
