"""Do the files `patchforge push` uploads change, in the real tools' own loading code, exactly the weights
patchforge's own `fuse_forget_patches` changes?

An SD 1.5-sized random-weight pipeline (benchmarks/bench_gpu.py's config, a diffusers folder) and random
forget patches on it: UNet attention, feed-forward and 1x1-conv projections plus the text encoder, once with
alpha = rank and once with alpha != rank. The reference is every weight `load_forget_patch` +
`fuse_forget_patches` changes. Each published file (`write_published`, what push uploads) is then applied by
each tool present, in a process of its own, with the tool's code unchanged:

    kohya     sd-scripts' networks/merge_lora.py `merge_to_sd_model` on the pipeline's UNet and text encoder
              (it finds modules by class name, and diffusers' UNet classes are the ones it targets)
    comfyui   `comfy.diffusers_load.load_diffusers` -> `comfy.sd.load_lora_for_models` -> `patch_model()`,
              started with `--cpu --fp32-text-enc` (its default fp16 text encoder rounds every weight)

A row: the modules the tool changed against the reference's, and the largest difference between the tool's
weight change and the reference's over every module either changed.

    python benchmarks/real_loaders.py --kohya SD_SCRIPTS_DIR --comfyui COMFYUI_DIR [--workdir /tmp/pf_loaders]
        [--families sd15 flux] [--tiny]

FLUX.1 (kohya only): a FLUX.1-layout transformer at the released width with one double and one single block
and a random patch on every attention projection, through sd-scripts' `networks/flux_merge_lora.py`
(`merge_to_flux_model`, Black Forest Labs' layout; both sides converted with sd-scripts' own
`library/flux_utils.convert_diffusers_sd_to_bfl`).

A tool's folder is a checkout of its public repository (ComfyUI's: the folder that holds `comfy/`). Python
packages the tools import and patchforge does not install (einops for ComfyUI) go on --extra-path; imports
a tool makes at module level for features not used here (torchvision, torchsde, kornia) are stubbed.
--tiny shrinks the widths to check the script in seconds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]  # proj_in: a 1x1 conv in SD 1.5
PATCHES = {"alpha=rank": (4, 4.0), "alpha!=rank": (4, 2.0)}  # name -> (rank, alpha)
COMPONENTS = ("unet", "text_encoder")


def weights(pipe, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every Linear/Conv weight of the UNet and text encoder, keyed "component.module" (a fused PEFT layer
    keeps the base weight in its .base_layer)."""
    return {key(comp, name.replace(".base_layer", "")): _snap(m.weight, copy)
            for comp in COMPONENTS for name, m in getattr(pipe, comp).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name}


def key(comp: str, module: str) -> str:
    """One name per weight across transformers versions (CLIPTextModel's modules lost their `text_model.`
    prefix in transformers 5)."""
    return f"{comp}.{module.removeprefix('text_model.')}"


def _snap(w: torch.Tensor, copy: bool) -> torch.Tensor:
    """fp32 values; a copy for the "before" side, a view where possible for the "after" side (memory)."""
    w = w.detach().float()
    return w.clone() if copy else w


def changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] - w for k, w in before.items() if not torch.equal(after[k], w)}


def compare(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    worst = {comp: 0.0 for comp in COMPONENTS}
    for k in set(reference) | set(got):
        diff = float((got.get(k, torch.zeros(())) - reference.get(k, torch.zeros(()))).abs().max())
        worst[k.split(".")[0]] = max(worst.get(k.split(".")[0], 0.0), diff)
    return {"modules_expected": len(reference), "modules_changed": len(got),
            "missed": len(set(reference) - set(got)), "extra": len(set(got) - set(reference)),
            "max_abs_diff": max(worst.values()), **{f"max_abs_diff_{c}": v for c, v in worst.items()}}


# ----------------------------------------------------------------------------- the tools, each in a child

def stub_modules(names) -> None:
    """Module-level imports of features this check never calls; transformers and diffusers are asked first,
    so that they keep seeing them as absent."""
    import diffusers.utils.import_utils  # noqa: F401  (its availability flags are set on import)
    import transformers.utils.import_utils as iu
    for check in ("is_torchvision_available", "is_torchvision_v2_available"):
        getattr(iu, check, lambda: None)()

    class Stub(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            sub = Stub(f"{self.__name__}.{attr}")
            sys.modules[sub.__name__] = sub
            setattr(self, attr, sub)
            return sub

        def __call__(self, *args, **kwargs):  # e.g. a transform built at import time and never used here
            return self

    for name in names:
        sys.modules.setdefault(name, Stub(name))


def apply_kohya(tool: Path, model: Path, lora: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    sys.path[:0] = [str(tool), str(tool / "networks")]
    stub_modules(["torchvision", "torchvision.transforms", "torchvision.transforms.functional"])
    import merge_lora  # sd-scripts/networks/merge_lora.py

    # the two models merge_lora edits (the tokenizer is not needed, and kohya's pinned transformers may not
    # read the one a newer transformers wrote)
    pipe = types.SimpleNamespace(unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                                 text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
    before = weights(pipe)
    merge_lora.merge_to_sd_model(pipe.text_encoder, pipe.unet, [str(lora)], [1.0], torch.float32)
    return changes(before, weights(pipe, copy=False))


def apply_comfyui(tool: Path, model: Path, lora: Path) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(tool))
    # ComfyUI keeps text encoders in fp16 unless told otherwise: their weight change would then differ from
    # any fp32 reference by fp16 rounding (~1e-4), whatever the file; in fp32 the check is exact
    sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
    stub_modules(["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchsde",
                  "kornia", "spandrel"])
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.diffusers_load
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return _comfyui_changes(comfy, model, lora)


def _comfyui_changes(comfy, model: Path, lora: Path) -> dict[str, torch.Tensor]:
    unet, clip, _ = comfy.diffusers_load.load_diffusers(str(model), output_vae=False, output_clip=True)
    # ComfyUI's own names -> diffusers' ("component.module"), by ComfyUI's own map
    to_diffusers = {f"diffusion_model.{ldm}": f"unet.{key.removesuffix('.weight')}"
                    for key, ldm in comfy.utils.unet_to_diffusers(unet.model.model_config.unet_config).items()
                    if key.endswith(".weight")}

    def state(model_patcher, clip_model, copy: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        for k, w in model_patcher.model.state_dict().items():
            if k in to_diffusers and w.ndim >= 2:
                out[to_diffusers[k]] = _snap(w, copy)
        for k, w in clip_model.state_dict().items():
            if k.endswith(".weight") and w.ndim >= 2 and ".transformer." in k:
                out[key("text_encoder", k.split(".transformer.", 1)[1].removesuffix(".weight"))] = _snap(w, copy)
        return out

    before = state(unet, clip.cond_stage_model)
    lora_sd = comfy.utils.load_torch_file(str(lora), safe_load=True)
    new_unet, new_clip = comfy.sd.load_lora_for_models(unet, clip, lora_sd, 1.0, 1.0)
    new_unet.patch_model()
    new_clip.patcher.patch_model()
    return changes(before, state(new_unet, new_clip.cond_stage_model, copy=False))


def kohya_flux_changes(tool: Path, model: Path, lora: Path, fused: Path) -> tuple[dict, dict]:
    """FLUX.1 through sd-scripts' networks/flux_merge_lora.py `merge_to_flux_model`, which merges into a
    Black Forest Labs-layout transformer file: the base is converted with sd-scripts' own
    `flux_utils.convert_diffusers_sd_to_bfl`, and so is patchforge's fused transformer, so both changes are
    compared in that layout. Returns (the tool's changes, the reference changes)."""
    from safetensors.torch import load_file, save_file
    sys.path[:0] = [str(tool), str(tool / "networks")]
    stub_modules(["torchvision", "torchvision.transforms", "torchvision.transforms.functional"])
    import flux_merge_lora
    from library import flux_utils

    cfg = json.loads((model / "transformer" / "config.json").read_text())
    blocks = (cfg["num_layers"], cfg["num_single_layers"])
    base = flux_utils.convert_diffusers_sd_to_bfl(
        load_file(model / "transformer" / "diffusion_pytorch_model.safetensors"), *blocks)
    bfl_file = fused.parent / "base.bfl.safetensors"
    save_file({k: v.contiguous() for k, v in base.items()}, bfl_file)
    merged, _, _ = flux_merge_lora.merge_to_flux_model("cpu", "cpu", str(bfl_file), None, None, [str(lora)], [1.0],
                                                       torch.float32, torch.float32)
    expected = flux_utils.convert_diffusers_sd_to_bfl(load_file(fused), *blocks)

    def delta(after: dict) -> dict:
        return {f"transformer.{k}": after[k].float() - w.float() for k, w in base.items()
                if not torch.equal(after[k], w)}
    return delta(merged), delta(expected)


TOOLS = {"kohya": apply_kohya, "comfyui": apply_comfyui}


def child(tool_name: str, tool: Path, model: Path, lora: Path, reference: Path) -> None:
    from safetensors.torch import load_file
    if tool_name == "kohya-flux":  # `reference`: the fused transformer, compared in the tool's own layout
        got, expected = kohya_flux_changes(tool, model, lora, reference)
    else:
        got, expected = TOOLS[tool_name](tool, model, lora), load_file(reference)
    print("RESULT " + json.dumps(compare(expected, got)))


# ----------------------------------------------------------------------------- the parent

def run_child(tool_name: str, tool: Path, model: Path, lora: Path, reference: Path, env: dict) -> dict:
    """One tool applying one file, in a process of its own: its comparison, or the error it ended with."""
    run = subprocess.run([sys.executable, __file__, "--child", tool_name, str(tool), str(model), str(lora),
                          str(reference)], capture_output=True, text=True, env=env)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}


def flux_rows(args, tool: Path, version: str, env: dict) -> list[dict]:
    """A FLUX.1-layout transformer at the released width (3072 = 24 heads of 128; one double and one single
    block, benchmarks/dit_memory.py's flux-1+1-256 folder) with a random patch on every attention projection
    and the prompt's two projections (pooled vector, T5 tokens), rank 4, alpha 2: the kohya file through
    sd-scripts' FLUX merge."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    import patchforge.io.loading as pf
    from dit_memory import folder_for
    from patchforge.io.hub import write_published
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import DIT_TARGETS, make_patch

    model = folder_for("flux-1+1-256", args.workdir)
    folder = args.workdir / "flux"
    folder.mkdir(parents=True, exist_ok=True)
    pipe = FluxPipeline.from_pretrained(model)
    # and the two projections of the prompt that uce edits: the pooled CLIP vector's (BFL's vector_in.in_layer)
    # and the T5 tokens' (txt_in)
    path = make_patch(pipe, folder / "patch.safetensors", "a test concept", rank=4, alpha=2.0, scale=0.02, text=False,
                      targets=DIT_TARGETS + ["text_embedder.linear_1", "context_embedder"])
    pf.load_forget_patch(pipe, path)
    pf.fuse_forget_patches(pipe)
    fused = {k.replace(".base_layer", ""): v.contiguous() for k, v in pipe.transformer.state_dict().items()
             if "lora_" not in k}
    save_file(fused, folder / "fused_transformer.safetensors")
    del pipe, fused
    rows = []
    for file_name, file in write_published(read_patch(path), folder):
        if file_name.endswith(".kohya.safetensors"):
            result = run_child("kohya-flux", tool, model, file, folder / "fused_transformer.safetensors", env)
            rows.append({"patch": "FLUX alpha!=rank", "tool": "kohya", "version": version, "file": file_name,
                         **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def released_text_layout(model: Path) -> None:
    """Write the text encoder's weights with the `text_model.` prefix, as SD 1.5's released file has them
    (transformers 5 saves without it and reads both; loaders that read the file themselves, as ComfyUI
    does, know only the released layout and would otherwise leave the encoder unloaded)."""
    from safetensors.torch import load_file, save_file
    path = model / "text_encoder" / "model.safetensors"
    sd = load_file(path)
    if not all(k.startswith("text_model.") for k in sd):
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, path,
                  metadata={"format": "pt"})


def tool_version(tool: Path) -> str:
    out = subprocess.run(["git", "-C", str(tool), "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    return out.stdout.strip() or "no git history"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kohya", type=Path, help="a checkout of kohya-ss/sd-scripts")
    ap.add_argument("--comfyui", type=Path, help="a checkout of ComfyUI (the folder holding comfy/)")
    ap.add_argument("--extra-path", type=Path, action="append", default=[],
                    help="a folder of packages a tool needs (put on PYTHONPATH for the tools' processes)")
    ap.add_argument("--version", action="append", default=[], metavar="TOOL=TEXT",
                    help="the tool's version for the table, where its folder has no git history")
    ap.add_argument("--families", nargs="+", default=["sd15", "flux"], choices=["sd15", "flux"],
                    help="flux: kohya only (the FLUX merge of sd-scripts)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf_loaders"))
    ap.add_argument("--tiny", action="store_true", help="toy widths: checks the script, its numbers mean nothing")
    ap.add_argument("--child", nargs=5, metavar=("TOOL", "TOOL_DIR", "MODEL", "LORA", "REFERENCE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, *paths = args.child
        return child(name, *map(Path, paths))

    import os

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    import patchforge.io.loading as pf
    from bench_gpu import SD15, build, shrink
    from patchforge.io.hub import write_published
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import make_patch

    tools = {n: getattr(args, n) for n in TOOLS if getattr(args, n)}
    versions = dict(v.split("=", 1) for v in args.version)
    for name, folder in tools.items():
        if not folder.is_dir():
            sys.exit(f"--{name} {folder}: not a folder")
    torch.manual_seed(0)
    if "sd15" in args.families:  # a FLUX-only run needs no SD 1.5 folder
        model = build("sd15", shrink(SD15) if args.tiny else SD15,
                      args.workdir / ("sd15-tiny" if args.tiny else "sd15"), dtype=torch.float32)
        released_text_layout(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*args.extra_path, HERE.parent]))}
    rows = []
    for label, (rank, alpha) in PATCHES.items() if "sd15" in args.families else ():
        folder = args.workdir / label
        folder.mkdir(parents=True, exist_ok=True)
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        path = make_patch(pipe, folder / "patch.safetensors", "a test concept", rank=rank, alpha=alpha,
                          scale=0.02, targets=UNET_TARGETS)
        before = weights(pipe)
        pf.load_forget_patch(pipe, path)
        pf.fuse_forget_patches(pipe)
        reference = changes(before, weights(pipe, copy=False))
        del pipe, before
        save_file({k: v.contiguous() for k, v in reference.items()}, folder / "reference.safetensors")
        published = write_published(read_patch(path), folder)
        print(f"{label}: {len(reference)} modules changed by fuse_forget_patches "
              f"({sum(k.startswith('text_encoder.') for k in reference)} in the text encoder)", flush=True)
        for tool_name, tool in tools.items():
            for file_name, file in published:
                result = run_child(tool_name, tool, model, file, folder / "reference.safetensors", env)
                version = versions.get(tool_name) or tool_version(tool)
                rows.append({"patch": label, "tool": tool_name, "version": version, "file": file_name,
                             **result})
                print(json.dumps(rows[-1]), flush=True)
    if "kohya" in tools and "flux" in args.families:
        rows += flux_rows(args, tools["kohya"], versions.get("kohya") or tool_version(tools["kohya"]), env)
    print("\n| patch | tool (version) | file | modules changed / expected | missed | extra | largest difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['patch']} | {r['tool']} ({r['version']}) | `{r['file']}` | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['patch']} | {r['tool']} ({r['version']}) | `{r['file']}` | {r['modules_changed']} / "
                  f"{r['modules_expected']} | {r['missed']} | {r['extra']} | {r['max_abs_diff']:.2g} |")
    (args.workdir / "real_loaders.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
