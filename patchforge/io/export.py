"""`patchforge export`: a forget patch in the kohya-ss / A1111 / ComfyUI LoRA layout (io/kohya.py), or fused
into a full pipeline.

Fused (`--format pipeline`): the patch is baked into the base weights and the pipeline saved with
save_pretrained, for whoever distributes a model rather than a LoRA, and for evaluation harnesses
that take a model folder. A LoRA can be removed by anyone who holds the weights; a fused model
cannot be unpatched by unloading (though a diff against the public base recovers the change).

The kohya layout is described in io/kohya.py.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.atomic import atomic_dir
from ..core.output_paths import check_output_file, check_output_folder
from ..core.pipeline_loading import check_model, load_pipeline, model_folders, public_model_id
from ..errors import PatchforgeError
from .kohya import FLUX_OUTSIDE, export_kohya
from .loading import fuse_forget_patches, load_forget_patch
from .patch_format import public_metadata, read_patch


FUSED_INFO = "patchforge.json"  # beside model_index.json: which patch was baked in, at what weight


def export_pipeline(patch_path, model: str | None, out_dir, weight: float = 1.0, dtype: str = "fp32") -> Path:
    """Bake a forget patch into `model` and save the fused pipeline to out_dir (atomically: written
    to a temporary folder, then renamed). The fuse runs in fp32; `dtype` is what is saved. out_dir must
    be new, empty or an earlier export (core/output_paths.py), never the model or near it."""
    check_model(model)
    patch = read_patch(patch_path)  # a bad patch fails before the model loads
    if not math.isfinite(weight):
        raise PatchforgeError(f"--weight {weight}: must be a finite number")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise PatchforgeError(f"--dtype {dtype}: choose one of {', '.join(dtypes)}")
    out = check_output_folder(out_dir, "-o", marker=FUSED_INFO, protect=model_folders(model))
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    load_forget_patch(pipe, patch.path, weight=weight)
    fuse_forget_patches(pipe)
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay in the base layers
    info = {"fused_patch": patch.path.name, "weight": weight,
            **{k: v for k, v in public_metadata(patch.metadata).items() if k.startswith("patchforge.")}}
    public = public_model_id(model)  # diffusers writes where each part was loaded from into its config
    for part in [pipe, *pipe.components.values()]:
        if hasattr(part, "register_to_config"):
            part.register_to_config(_name_or_path=public)
        elif hasattr(getattr(part, "config", None), "_name_or_path"):
            part.config._name_or_path = public
    with atomic_dir(out) as tmp:
        pipe.to(dtypes[dtype]).save_pretrained(tmp)
        (tmp / FUSED_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    return Path(out_dir)


def run_command(args) -> int:
    if args.format == "kohya":
        if args.output:
            check_output_file(args.output, "-o", folder_ok=True)
        out = export_kohya(args.patch, args.output)
        print(out)
        with safe_open(str(out), "pt") as f:
            outside = sorted({name for name in FLUX_OUTSIDE.values() for k in f.keys() if k.startswith(name + ".")})
        if outside:
            # diffusers 0.42's kohya-FLUX converter renames these keys without the "transformer." prefix its
            # loader then filters on, and so drops them with a log line only: that part of the edit would be gone
            print(f"note: this FLUX patch edits layers outside the blocks ({', '.join(outside)}): kohya's FLUX merge "
                  "applies them, diffusers' load_lora_weights drops them from this kohya file; in diffusers load "
                  "the patch file itself", file=sys.stderr)
        return 0
    if not args.output:
        raise PatchforgeError("--format pipeline writes a folder: give it with -o DIR")
    if args.model is None:
        raise PatchforgeError("--format pipeline needs the base to fuse into: --model FOLDER_OR_REPO_ID")
    out = export_pipeline(args.patch, args.model, args.output, weight=args.weight, dtype=args.dtype)
    print(f"fused {args.patch} into {args.model} -> {out} (a full pipeline: load it with "
          "DiffusionPipeline.from_pretrained)")
    return 0
