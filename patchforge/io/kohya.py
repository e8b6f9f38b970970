"""A forget patch in the kohya-ss layout, which ComfyUI, AUTOMATIC1111/Forge and kohya sd-scripts read.

Keys: `lora_unet_{module with . -> _}` and `lora_te_...` (SDXL: `lora_te1_` / `lora_te2_`), each with
`.lora_down.weight` (= PEFT A), `.lora_up.weight` (= B) and a scalar `.alpha` such that
alpha / rank equals the PEFT scale. Written here rather than with diffusers'
convert_state_dict_to_kohya, which sets alpha = rank and so loses the patch's real strength.
UNet module names stay in diffusers' spelling (what kohya-ss uses for SD 1.x / 2.x; diffusers,
ComfyUI and A1111 also read it for SDXL).

FLUX.1: kohya-ss (sd-scripts) and ComfyUI name the transformer's layers as Black Forest Labs' own
checkpoint does, where q, k and v are one fused layer: `lora_unet_double_blocks_{i}_txt_attn_qkv`
(diffusers' add_q/add_k/add_v_proj), `..._img_attn_qkv` (to_q/to_k/to_v), `..._txt_attn_proj`
(to_add_out), `..._img_attn_proj` (to_out.0), `..._{img,txt}_mlp_{0,2}`, and in the single-stream
blocks `lora_unet_single_blocks_{i}_linear1` (to_q, to_k, to_v and proj_mlp fused) and `..._linear2`
(proj_out); the pooled CLIP vector's projection (diffusers' time_text_embed.text_embedder.linear_1) is
`lora_unet_vector_in_in_layer`, the T5 tokens' projection (context_embedder) `lora_unet_txt_in`; the CLIP text
encoder is `lora_te1_`. A patch's separate LoRAs become one LoRA on the
fused layer without changing what it computes: the down matrices are stacked (a zero block for a
part the patch leaves alone) and the up matrix is block-diagonal, each part's scale folded into its
block, alpha = rank. SD3 has no kohya layout that diffusers and ComfyUI share: its patch file itself
(diffusers `transformer.*` keys) is what they load.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..core.atomic import atomic_path
from ..errors import PatchforgeError, one_line
from .patch_format import (K_BASE_FAMILY, K_CONCEPT, K_METHOD, K_PREDICTION, TEXT_COMPONENTS, TEXT_PREFIX, Patch,
                           module_rank_alpha, peft_name, public_metadata, read_patch)


# diffusers module (after the block index) -> (kohya layer, part, parts): FLUX.1's fused layers
FLUX_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3),
               "attn.to_v": ("img_attn_qkv", 2, 3), "attn.add_q_proj": ("txt_attn_qkv", 0, 3),
               "attn.add_k_proj": ("txt_attn_qkv", 1, 3), "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
               "attn.to_out.0": ("img_attn_proj", 0, 1), "attn.to_add_out": ("txt_attn_proj", 0, 1),
               "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
               "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1)}
FLUX_SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
               "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1)}
# layers outside the blocks, which uce edits: the pooled CLIP vector's projection, BFL's `vector_in.in_layer`,
# and the T5 tokens' projection into the text stream, `txt_in` (kohya's FLUX merge reads both; diffusers'
# kohya-FLUX converter drops them: patchforge export says so)
FLUX_OUTSIDE = {"time_text_embed.text_embedder.linear_1": "lora_unet_vector_in_in_layer",
                "context_embedder": "lora_unet_txt_in"}
FLUX_MLP_RATIO = 4  # linear1's MLP part is 4 x the width (FLUX.1's mlp_ratio)


def flux_kohya_name(module: str) -> tuple[str, int, int]:
    """A FLUX transformer module (diffusers name) -> (kohya layer name, part, parts of the fused layer)."""
    if module in FLUX_OUTSIDE:
        return FLUX_OUTSIDE[module], 0, 1
    for prefix, table, kind in (("transformer_blocks.", FLUX_DOUBLE, "double_blocks"),
                                ("single_transformer_blocks.", FLUX_SINGLE, "single_blocks")):
        if module.startswith(prefix):
            index, _, rest = module[len(prefix):].partition(".")
            if index.isdigit() and rest in table:
                layer, part, parts = table[rest]
                return f"lora_unet_{kind}_{index}_{layer}", part, parts
    raise PatchforgeError(f"transformer.{one_line(module, 80)}: no kohya / ComfyUI FLUX layer holds this module "
                          "(export covers the attention and MLP layers of the double- and single-stream blocks "
                          "and the prompt's two projections, txt_in and vector_in)")


def flux_kohya_state_dict(patch: Patch) -> dict[str, torch.Tensor]:
    """FLUX.1 patch -> kohya / ComfyUI keys on the fused layers (module docstring)."""
    fused: dict[str, dict[int, tuple]] = {}
    for module in patch.modules("transformer"):
        name, part, parts = flux_kohya_name(module)
        a = patch.state_dicts["transformer"][f"{module}.lora_A.weight"].float()
        b = patch.state_dicts["transformer"][f"{module}.lora_B.weight"].float() * patch.scale("transformer", module)
        fused.setdefault(name, {})[part] = (a, b, parts)
    out = {}
    for name, pieces in fused.items():
        parts = next(iter(pieces.values()))[2]
        width = next(iter(pieces.values()))[0].shape[1]  # the layer's input width
        if any(a.dim() != 2 or a.shape[1] != width for a, _, _ in pieces.values()):
            raise PatchforgeError(f"kohya export: the parts of FLUX layer {name} read inputs of different widths: a "
                                  f"damaged or forged patch")
        dims = [pieces[i][1].shape[0] if i in pieces else (width * FLUX_MLP_RATIO if i == 3 else width)
                for i in range(parts)]
        # only the parts the patch has: a part it leaves alone gets no rank (no dead zero block in down)
        total = sum(a.shape[0] for a, _, _ in pieces.values())
        down = torch.zeros(total, width)
        up = torch.zeros(sum(dims), total)
        col = 0
        for i in sorted(pieces):
            a, b, _ = pieces[i]
            down[col:col + a.shape[0]] = a
            row = sum(dims[:i])
            up[row:row + b.shape[0], col:col + b.shape[1]] = b
            col += a.shape[0]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(total), dtype=torch.float32)  # scale 1: folded into up
    return out


def kohya_state_dict(patch: Patch) -> dict[str, torch.Tensor]:
    family = patch.metadata.get(K_BASE_FAMILY, "")
    if "transformer" in patch.components or family.startswith(("sd3", "flux")):
        if not family.startswith("flux"):
            raise PatchforgeError(f"kohya export: no kohya layout for {one_line(family, 40)} patches that diffusers "
                                  "and ComfyUI share; the patch file itself (transformer.* keys) is what they load")
        _check_covers(patch, family)
        out = flux_kohya_state_dict(patch) if "transformer" in patch.components else {}
        out.update(_kohya_text(patch, {"text_encoder": "lora_te1_"}))
        return out
    _check_covers(patch, family)
    sdxl = "text_encoder_2" in patch.components or patch.metadata.get(K_BASE_FAMILY, "").startswith("sdxl")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    return _kohya_text(patch, prefixes)


def _check_covers(patch: Patch, family: str) -> None:
    """Every component of the patch has a place in the family's kohya layout (else the export would
    silently drop it: an SD 1.x patch claiming FLUX exported an empty file)."""
    layout = ("transformer", "text_encoder") if family.startswith("flux") else ("unet", "text_encoder",
                                                                                "text_encoder_2")
    stray = [c for c in patch.components if c not in layout]
    if stray:
        raise PatchforgeError(f"kohya export: the patch holds {', '.join(stray)} weights but records the base family "
                              f"{one_line(family or '?', 30)}, which has none: a damaged or forged patch")


def _kohya_text(patch: Patch, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Module-by-module kohya keys for the components in `prefixes` (the UNet's, the text encoders')."""
    out = {}
    for comp in [c for c in patch.components if c in prefixes]:
        cfg = patch.lora_configs[comp]
        for module in patch.modules(comp):
            name = TEXT_PREFIX + module.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS else module
            key = prefixes[comp] + name.replace(".", "_")
            a = patch.state_dicts[comp][f"{module}.lora_A.weight"]
            rank = a.shape[0]
            # kohya scales by alpha / rank; PEFT by lora_alpha / r (or / sqrt(r) with rsLoRA)
            alpha = patch.scale(comp, module) * rank
            if not math.isclose(rank, module_rank_alpha(cfg, peft_name(comp, module))[0]):
                raise PatchforgeError(f"{comp}.{module} has rank {rank} but its config says otherwise: re-save the "
                                      "patch")
            out[f"{key}.lora_down.weight"] = a.contiguous()
            out[f"{key}.lora_up.weight"] = patch.state_dicts[comp][f"{module}.lora_B.weight"].contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_metadata(patch: Patch, title: str) -> dict[str, str]:
    md = public_metadata(patch.metadata)
    family = md.get(K_BASE_FAMILY, "")
    vpred = md.get(K_PREDICTION) == "v_prediction"
    side = 1024 if family.startswith(("sdxl", "flux", "sd3")) else 768 if vpred else 512  # the base's native size
    flux = family.startswith("flux")
    if flux:
        base = "flux1"
        arch = "flux-1-schnell/lora" if "schnell" in family else "flux-1-dev/lora"
    elif family.startswith("sdxl"):
        base, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    elif family.startswith("sd2"):
        base, arch = "sd_v2", "stable-diffusion-v2-768-v/lora" if vpred else "stable-diffusion-v2-512/lora"
    else:
        base, arch = "sd_v1", "stable-diffusion-v1/lora"
    sd = kohya_state_dict(patch)
    # what the tensors hold (FLUX's fused layers have the parts' ranks summed): one value, else the largest
    dims = sorted({v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")})
    alphas = sorted({v.item() for k, v in sd.items() if k.endswith(".alpha")})
    out = {
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": str(dims[-1]),
        "ss_network_alpha": str(alphas[-1]),
        "ss_base_model_version": base,
        "ss_v2": str(family.startswith("sd2")),
        "ss_output_name": title,
        "ss_training_comment": f"patchforge forget patch: {md.get(K_CONCEPT, '')} ({md.get(K_METHOD, '')})",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/black-forest-labs/flux" if flux else
        "https://github.com/Stability-AI/generative-models" if base.startswith("sdxl") else "diffusers",
        "modelspec.title": title,
        "modelspec.description": f"Forget patch: removes '{md.get(K_CONCEPT, '')}'",
        "modelspec.prediction_type": "flow" if flux else "v" if vpred else "epsilon",
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
