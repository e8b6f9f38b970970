"""Export a forget patch to the kohya-ss / A1111 / ComfyUI LoRA layout.

Keys: `lora_unet_{module with . -> _}` and `lora_te_...` (SDXL: `lora_te1_` / `lora_te2_`), each with
`.lora_down.weight` (= PEFT A), `.lora_up.weight` (= B) and a scalar `.alpha` such that
alpha / rank equals the PEFT scale. Written here rather than with diffusers'
convert_state_dict_to_kohya, which sets alpha = rank and so loses the patch's real strength.
UNet module names stay in diffusers' spelling (what kohya-ss uses for SD 1.x / 2.x; diffusers,
ComfyUI and A1111 also read it for SDXL).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import PatchforgeError
from .patch_format import (K_BASE_FAMILY, K_CONCEPT, K_METHOD, K_PREDICTION, TEXT_COMPONENTS, TEXT_PREFIX, Patch,
                           pattern_value, read_patch)


def kohya_state_dict(patch: Patch) -> dict[str, torch.Tensor]:
    sdxl = "text_encoder_2" in patch.components or patch.metadata.get(K_BASE_FAMILY, "").startswith("sdxl")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for comp in patch.components:
        cfg = patch.lora_configs[comp]
        for module in patch.modules(comp):
            name = TEXT_PREFIX + module.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS else module
            key = prefixes[comp] + name.replace(".", "_")
            a = patch.state_dicts[comp][f"{module}.lora_A.weight"]
            rank = a.shape[0]
            # kohya scales by alpha / rank; PEFT by lora_alpha / r (or / sqrt(r) with rsLoRA)
            alpha = patch.scale(comp, module) * rank
            if not math.isclose(rank, pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank))):
                raise PatchforgeError(f"{comp}.{module} has rank {rank} but its config says otherwise: re-save the patch")
            out[f"{key}.lora_down.weight"] = a.contiguous()
            out[f"{key}.lora_up.weight"] = patch.state_dicts[comp][f"{module}.lora_B.weight"].contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_metadata(patch: Patch, title: str) -> dict[str, str]:
    md = patch.metadata
    family = md.get(K_BASE_FAMILY, "")
    vpred = md.get(K_PREDICTION) == "v_prediction"
    if family.startswith("sdxl"):
        base, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    elif family.startswith("sd2"):
        base, arch = "sd_v2", "stable-diffusion-v2-768-v/lora" if vpred else "stable-diffusion-v2-512/lora"
    else:
        base, arch = "sd_v1", "stable-diffusion-v1/lora"
    cfg = patch.lora_configs[patch.components[0]]
    alphas = {str(v.item()) for k, v in kohya_state_dict(patch).items() if k.endswith(".alpha")}
    out = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.get("r")),
        "ss_network_alpha": alphas.pop() if len(alphas) == 1 else str(cfg.get("lora_alpha")),
        "ss_base_model_version": base,
        "ss_v2": str(family.startswith("sd2")),
        "ss_output_name": title,
        "ss_training_comment": f"patchforge forget patch: {md.get(K_CONCEPT, '')} ({md.get(K_METHOD, '')})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base.startswith("sdxl")
        else "diffusers",
        "modelspec.title": title,
        "modelspec.description": f"Forget patch: removes '{md.get(K_CONCEPT, '')}'",
        "modelspec.prediction_type": "v" if vpred else "epsilon",
        "modelspec.tags": "concept-erasure,patchforge",
    }
    out.update({k: v for k, v in md.items() if k.startswith("patchforge.")})  # provenance travels along
    return out


def export_kohya(patch_path, out_path=None) -> Path:
    import safetensors.torch

    patch = read_patch(patch_path)
    out = Path(out_path) if out_path else patch.path.with_name(patch.path.stem + ".kohya.safetensors")
    if out.is_dir():
        out = out / (patch.path.stem + ".kohya.safetensors")
    with atomic_path(out) as tmp:
        safetensors.torch.save_file(kohya_state_dict(patch), str(tmp), metadata=kohya_metadata(patch, out.stem))
    return out


def run_command(args) -> int:
    print(export_kohya(args.patch, args.output))
    return 0
