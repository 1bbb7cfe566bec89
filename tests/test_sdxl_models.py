"""SDXL models from outside: LoRAs (diffusers' and kohya's formats) on the UNet and both text encoders, at tune
and edit time, refused in one line on the other base; and single-file checkpoints in Stability's original layout,
converted once with both text encoders."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tavcli.models.architectures import build_model, configs

from .conftest import CLIP, RunTav, tav_ok
from .ldm_format import _unet_key, _vae_key, _weights

SMALL = ["--frames", "2", "--width", "64", "--height", "64"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def in_cache(cache_root: Path) -> Iterator[None]:
    """The test cache and no hub for module fixtures too (the autouse `isolated_cache` comes after them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAV_CACHE_DIR", str(cache_root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", narrow=True)


@pytest.fixture(scope="module")
def sdxl_lora(sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA of the UNet's attention and of both text encoders, made with peft, saved as diffusers tools save it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(sdxl / "unet")
    encoders = [CLIPTextModel.from_pretrained(sdxl / "text_encoder")]
    encoders.append(CLIPTextModelWithProjection.from_pretrained(sdxl / "text_encoder_2"))
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    for encoder in encoders:  # peft itself: transformers' add_adapter asks for a newer peft than loading needs
        inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS, init_lora_weights=False), encoder
        )
    first, second = (convert_state_dict_to_diffusers(get_peft_model_state_dict(e)) for e in encoders)
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=first,
        text_encoder_2_lora_layers=second,
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def _kohya(lora: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA under kohya's SDXL names: the UNet's modules by their original (sgm) names, the text
    encoders' with transformers' `text_model.` level, `lora_down`/`lora_up` and an alpha of the rank (scale 1)."""
    kohya = {}
    for key, tensor in lora.items():
        part, _, rest = key.partition(".")
        match = re.fullmatch(r"(.*)\.lora(?:_linear_layer)?\.(down|up)\.weight", rest)
        assert match, key
        module, direction = match[1], match[2]
        if part == "unet":
            name = "lora_unet_" + _unet_key(f"{module}.weight", unet_config).removesuffix(".weight")
        else:
            module = module if module.startswith("text_model.") else f"text_model.{module}"
            name = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] + module
        name = name.replace(".", "_")
        kohya[f"{name}.lora_{direction}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0 if direction == "down" else 1]))
    return kohya


@pytest.fixture(scope="module")
def kohya_lora(sdxl: Path, sdxl_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kohya") / "kohya-sdxl.safetensors"
    save_file(_kohya(load_file(sdxl_lora), json.loads((sdxl / "unet" / "config.json").read_text())), path)
    return path


@pytest.fixture(scope="module")
def tuned(sdxl: Path, in_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("sdxl-tuned") / "p.tav"
    tav_ok("tune", CLIP, "a man is skiing", "--model", sdxl, "-p", project, "--steps", "1", *SMALL, "-q")
    return project


def _edit(run_tav: RunTav, project: Path, *extra: str | Path) -> bytes:
    code, out, err = run_tav("edit", "a panda is skiing", "-p", project, "--steps", "1", *extra)
    assert code == 0, err
    return Path(json.loads(out.splitlines()[0])["path"]).read_bytes()


def _outputs(components: Any, unet: Any) -> list[torch.Tensor]:
    """Both text encoders' states and pooled projection, and one UNet step: what a LoRA can move."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(1, 12)[None]
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, components.text_encoder_2.config.projection_dim, generator=generator)
    with torch.no_grad():
        second = components.text_encoder_2(ids)
        outputs = [components.text_encoder(ids)[0], second[0], second.text_embeds]
        if hasattr(unet, "time_ids"):  # the video UNet, on two frames: the pooled text packed as a last text row
            from tavcli.models.conditioning import pack_pooled

            latents = torch.randn(1, 4, 2, 8, 8, generator=generator)
            outputs.append(unet(latents, 500, pack_pooled(text, pooled)).sample)
        else:
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            latents = torch.randn(1, 4, 8, 8, generator=generator)
            outputs.append(unet(latents, 500, text, added_cond_kwargs=added).sample)
    return outputs


def _state(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in module.state_dict().items()} for module in modules]


def _grad_flags(*modules: torch.nn.Module) -> list[bool]:
    return [param.requires_grad for module in modules for param in module.parameters()]


def _same_state(one: list[dict[str, torch.Tensor]], other: list[dict[str, torch.Tensor]]) -> bool:
    return all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(one, other, strict=True)
    )


def test_an_edit_lora_adapts_the_tuned_unet_and_both_text_encoders_then_comes_off_exactly(
    tuned: Path, sdxl_lora: Path
) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tavcli.models.lora import applied_loras
    from tavcli.runtime import resolve_runtime
    from tavcli.store.project import Project
    from tavcli.workflow.session import Session

    session = Session(resolve_runtime("cpu", "fp32"))
    project = Project(tuned)
    components, unet = session.tuned_unet(project, project.find("tunes", project.current_tune()))
    second = components.text_encoder_2
    assert second is not None
    modules: tuple[torch.nn.Module, ...] = (components.text_encoder, second, unet, components.unet)
    before, state, flags = _outputs(components, unet), _state(*modules), _grad_flags(*modules)
    layer = "text_model.encoder.layers.0.self_attn.q_proj"
    weight = second.get_submodule(layer).weight.detach().clone()
    lora = load_file(sdxl_lora)
    down, up = (lora[f"text_encoder_2.{layer}.lora_linear_layer.{d}.weight"] for d in ("down", "up"))
    x = torch.randn(3, weight.shape[1])
    with applied_loras(components, unet, ((sdxl_lora, 0.5),)):
        during = _outputs(components, unet)
        assert all(not torch.equal(a, b) for a, b in zip(before, during, strict=True))  # all four parts moved
        adapted = second.get_submodule(layer)(x)
        torch.testing.assert_close(adapted, x @ (weight + 0.5 * up @ down).T, rtol=1e-5, atol=1e-5)  # at its scale
    assert not any(isinstance(m, BaseTunerLayer) for module in modules for m in module.modules())
    assert not any(getattr(module, "peft_config", None) for module in modules)
    assert _same_state(_state(*modules), state)
    assert _grad_flags(*modules) == flags  # peft froze them while it held them; some kernels round by it
    assert all(torch.equal(a, b) for a, b in zip(before, _outputs(components, unet), strict=True))


@pytest.mark.slow
def test_an_sdxl_lora_changes_the_edit_and_leaves_later_edits_as_they_were(
    tuned: Path, sdxl_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    plain = _edit(run_tav, tuned)
    assert _edit(run_tav, tuned, "--lora", sdxl_lora) != plain
    second_only = tmp_path / "text-encoder-2.safetensors"  # the second text encoder's part alone changes it too
    save_file({k: v for k, v in load_file(sdxl_lora).items() if k.startswith("text_encoder_2.")}, second_only)
    assert _edit(run_tav, tuned, "--lora", second_only) != plain
    assert _edit(run_tav, tuned, "--force") == plain  # no LoRA left in a cached embedding or the model


@pytest.mark.slow
def test_an_sdxl_lora_is_fused_at_tune_time(
    tuned: Path, sdxl: Path, sdxl_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    from tavcli.store.project import Project

    args: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", sdxl, "-p", tmp_path / "p.tav", *SMALL]
    code, out, err = run_tav(*args, "--steps", "1", "--lora", f"{sdxl_lora}:0.5")
    assert code == 0, err
    meta = json.loads((Path(json.loads(out.splitlines()[-1])["path"]) / "meta.json").read_text())
    plain = Project(tuned).find("tunes", Project(tuned).current_tune()).meta()
    assert "|lora=" in meta["model"]["model"] and meta["losses"] != plain["losses"]


def test_a_kohya_sdxl_lora_maps_onto_the_unet_and_both_text_encoders(
    sdxl: Path, sdxl_lora: Path, kohya_lora: Path
) -> None:
    """diffusers' kohya conversion (sgm block names, `lora_te1_`/`lora_te2_`) reaches all three parts: each moves,
    exactly as under the same LoRA in diffusers' format, loaded as adapters or fused (`lora=` in the model's name,
    as `tav tune --lora` loads it)."""
    from dataclasses import replace

    from peft.tuners.tuners_utils import BaseTunerLayer

    from tavcli.models.loading import load_components
    from tavcli.models.lora import load_lora, lora_loader
    from tavcli.models.resolving import resolve_model

    source = resolve_model(str(sdxl))
    outputs = {}
    for name, lora in (("base", None), ("diffusers", sdxl_lora), ("kohya", kohya_lora)):
        components = load_components(source, torch.device("cpu"), torch.float32)
        if lora is not None:
            pipe = lora_loader(components)
            load_lora(pipe, lora, "style")
            assert pipe.get_list_adapters() == {part: ["style"] for part in ("unet", "text_encoder", "text_encoder_2")}
        outputs[name] = _outputs(components, components.unet)
    fused = load_components(replace(source, loras=((kohya_lora, 1.0),)), torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, BaseTunerLayer) for part in (fused.unet, *fused.text_encoders) for m in part.modules())
    outputs["fused"] = _outputs(fused, fused.unet)
    for base, diffusers, kohya, merged in zip(
        *(outputs[k] for k in ("base", "diffusers", "kohya", "fused")), strict=True
    ):
        assert not torch.equal(kohya, base)
        torch.testing.assert_close(kohya, diffusers, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged, diffusers, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 1.x LoRA: SD 1.5's narrow UNet keeps its 768-wide cross-attention, the width that tells the base."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs("sd15", narrow=True)["unet"])
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("sd1-lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_a_lora_of_the_other_base_is_refused_in_one_line(
    sdxl: Path, sdxl_lora: Path, sd1_lora: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    cases: list[tuple[str | Path, Path, str, str]] = [
        (sdxl, sd1_lora, "SD 1.x, by its 768-wide cross-attention", "use a LoRA made for SDXL models"),
        ("tiny", sdxl_lora, "SDXL, by its text_encoder_2 keys", ""),
    ]
    for model, lora, base, hint in cases:
        project = tmp_path / f"{lora.parent.name}.tav"
        args: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", model, "--lora", lora, "-p", project]
        code, out, err = run_tav(*args, "--steps", "1", *SMALL, "-q")
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "does not fit this model" in err and f"it was made for {base}" in err and hint in err, err
        assert not (project / "tunes").exists()


def _sgm_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """An SDXL diffusers folder in Stability's original (sgm) single-file layout: the UNet under
    `model.diffusion_model.` (SD's names, plus `label_emb` for the size and pooled-text input), the VAE under
    `first_stage_model.`, the CLIP text encoder under `conditioner.embedders.0.transformer.` and the OpenCLIP one
    under `conditioner.embedders.1.model.` (`_open_clip`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["up_block_types"])
    added = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]  # SDXL's size and pooled-text input
    checkpoint = {}
    for name, tensor in _weights(folder / "unet").items():
        checkpoint[f"model.diffusion_model.{added.get(name) or _unet_key(name, unet_config)}"] = tensor
    for name, tensor in _weights(folder / "vae").items():
        key = _vae_key(name, blocks)
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        checkpoint[f"first_stage_model.{key}"] = tensor
    for name, tensor in _weights(folder / "text_encoder").items():
        name = name if name.startswith("text_model.") else f"text_model.{name}"
        checkpoint[f"conditioner.embedders.0.transformer.{name}"] = tensor
    checkpoint |= _open_clip(_weights(folder / "text_encoder_2"), "conditioner.embedders.1.model.")
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


def _open_clip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection under OpenCLIP's names: diffusers' own table (`openclip`) read backwards, the
    query, key and value projections joined into `in_proj`, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    renames = [(new, old) for new, old in table["transformer"].items() if not old.startswith("transformer.")]
    original = {}
    joined: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if name in table["layers"]:
            original[prefix + table["layers"][name]] = tensor.T if name == "text_projection.weight" else tensor
            continue
        for new, old in renames:
            name = name.replace(new, old)
        if match := re.fullmatch(r"(.*\.attn)\.([qkv])_proj\.(weight|bias)", name):
            joined.setdefault(f"{match[1]}.in_proj_{match[3]}", {})[match[2]] = tensor
        else:
            original[f"{prefix}transformer.{name}"] = tensor
    for name, parts in joined.items():
        original[f"{prefix}transformer.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return original


@pytest.mark.slow
def test_an_sdxl_single_file_converts_once_to_the_very_same_model_and_tunes(
    sdxl: Path, tmp_path: Path, run_tav: RunTav
) -> None:
    from tavcli.models.names import model_name
    from tavcli.models.resolving import resolve_model

    file = tmp_path / "sdxl.safetensors"
    save_file(_sgm_checkpoint(sdxl), file)
    args: list[str | Path] = ["tune", CLIP, "a man is skiing", "--model", file, "-p", tmp_path / "p.tav"]
    code, _, err = run_tav(*args, "--steps", "1", *SMALL)  # no configs, and no hub to find SDXL's
    assert code == 1 and "the hub is unreachable" in err and "SDXL base 1.0" in err, err
    code, _, err = run_tav(*args, "--model-config", "tiny", "--steps", "1", *SMALL)  # an SD model's configs
    assert code == 1 and "sdxl.safetensors is an SDXL checkpoint, but --model-config" in err, err
    args += ["--model-config", sdxl]
    code, _, err = run_tav(*args, "--steps", "1", *SMALL)
    assert code == 0 and "converting sdxl.safetensors" in err, err
    converted = resolve_model(model_name(str(file), str(sdxl))).folder
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = _weights(converted / part), _weights(sdxl / part)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k].float(), theirs[k]) for k in ours), part
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    code, out, err = run_tav(*args, "--steps", "1", *SMALL)
    assert code == 0 and "converting" not in err and '"cached": true' in out, err  # converted once


def test_an_sdxl_refiner_single_file_is_refused_before_conversion(tmp_path: Path, run_tav: RunTav) -> None:
    refiner = tmp_path / "refiner.safetensors"  # the refiner's only text encoder is OpenCLIP's, as embedder 0
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(4, 4)}, refiner)
    code, out, err = run_tav("tune", CLIP, "a man", "--model", refiner, "-p", tmp_path / "p.tav", *SMALL)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "refiner.safetensors is the SDXL refiner" in err and "Traceback" not in err
