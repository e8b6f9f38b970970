"""Export a forget patch: to the kohya-ss / A1111 / ComfyUI LoRA layout, or fused into a full pipeline.

Fused (`--format pipeline`): the patch is baked into the base weights and the pipeline saved with
save_pretrained, for whoever distributes a model rather than a LoRA, and for evaluation harnesses
that take a model folder. A LoRA can be removed by anyone who holds the weights; a fused model
cannot be unpatched by unloading (though a diff against the public base recovers the change).

Keys: `lora_unet_{module with . -> _}` and `lora_te_...` (SDXL: `lora_te1_` / `lora_te2_`), each with
`.lora_down.weight` (= PEFT A), `.lora_up.weight` (= B) and a scalar `.alpha` such that
alpha / rank equals the PEFT scale. Written here rather than with diffusers'
convert_state_dict_to_kohya, which sets alpha = rank and so loses the patch's real strength.
UNet module names stay in diffusers' spelling (what kohya-ss uses for SD 1.x / 2.x; diffusers,
ComfyUI and A1111 also read it for SDXL).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..core.atomic import atomic_dir, atomic_path
from ..errors import PatchforgeError
from .patch_format import (K_BASE_FAMILY, K_CONCEPT, K_METHOD, K_PREDICTION, TEXT_COMPONENTS, TEXT_PREFIX, Patch,
                           pattern_value, read_patch)


def kohya_state_dict(patch: Patch) -> dict[str, torch.Tensor]:
    sdxl = "text_encoder_2" in patch.components or patch.metadata.get(K_BASE_FAMILY, "").startswith("sdxl")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
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
                raise PatchforgeError(f"{comp}.{module} has rank {rank} but its config says otherwise: re-save the "
                                      "patch")
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


FUSED_INFO = "patchforge.json"  # beside model_index.json: which patch was baked in, at what weight


def export_pipeline(patch_path, model: str | None, out_dir, weight: float = 1.0, dtype: str = "fp32") -> Path:
    """Bake a forget patch into `model` and save the fused pipeline to out_dir (atomically: written
    to a temporary folder, then renamed). The fuse runs in fp32; `dtype` is what is saved."""
    from .loading import fuse_forget_patches, load_forget_patch
    from ..core.pipeline_loading import check_model, load_pipeline

    check_model(model)
    patch = read_patch(patch_path)  # a bad patch fails before the model loads
    if not math.isfinite(weight):
        raise PatchforgeError(f"--weight {weight}: must be a finite number")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise PatchforgeError(f"--dtype {dtype}: choose one of {', '.join(dtypes)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PatchforgeError(f"-o {out}: a file, not a folder")
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    load_forget_patch(pipe, patch.path, weight=weight)
    fuse_forget_patches(pipe)
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay in the base layers
    info = {"fused_patch": str(patch.path), "weight": weight, "base_model": str(model),
            **{k: v for k, v in patch.metadata.items() if k.startswith("patchforge.")}}
    with atomic_dir(out) as tmp:
        pipe.to(dtypes[dtype]).save_pretrained(tmp)
        (tmp / FUSED_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def run_command(args) -> int:
    if args.format == "kohya":
        print(export_kohya(args.patch, args.output))
        return 0
    if not args.output:
        raise PatchforgeError("--format pipeline writes a folder: give it with -o DIR")
    if args.model is None:
        raise PatchforgeError("--format pipeline needs the base to fuse into: --model FOLDER_OR_REPO_ID")
    out = export_pipeline(args.patch, args.model, args.output, weight=args.weight, dtype=args.dtype)
    print(f"fused {args.patch} into {args.model} -> {out} (a full pipeline: load it with "
          "DiffusionPipeline.from_pretrained)")
    return 0
