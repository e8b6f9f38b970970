"""Seconds per forget patch on SD 1.5- and SDXL-sized pipelines with random weights, on a GPU.

Timing does not depend on weight values, so no checkpoint is downloaded: the pipelines are
built from the real architectures' configs with random weights and saved as diffusers folders; then
`patchforge train --concept style:vangogh --model FOLDER` runs at default settings, exactly as a
user would run it, twice: with a cold reference cache (the base model generates the reference
images first) and warm. The tokenizer is the toy one (no CLIP vocabulary offline); the text encoders
have the real sizes.

    python benchmarks/bench_gpu.py [--arch sd15 sdxl] [--workdir /tmp/pf_gpu] [--tiny]

--tiny shrinks every width so the script can be checked on a CPU in seconds; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# The real architectures (diffusers configs of runwayml/stable-diffusion-v1-5 and SDXL base 1.0).
SD15 = dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                      attention_head_dim=8, sample_size=64,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            text=[dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)],
            vae=dict(block_out_channels=(128, 256, 512, 512), sample_size=512))
SDXL = dict(unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                      attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), sample_size=128,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
            text=[dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                  dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                       projection_dim=1280)],
            vae=dict(block_out_channels=(128, 256, 512, 512), sample_size=1024))


def shrink(cfg: dict) -> dict:
    """The same layout at toy widths (for --tiny): checks the script, not the hardware."""
    u = dict(cfg["unet"])
    u["block_out_channels"] = tuple(32 * (i + 1) for i in range(len(u["block_out_channels"])))
    heads = u["attention_head_dim"]
    u["attention_head_dim"] = 4 if isinstance(heads, int) else tuple(4 for _ in heads)
    u["cross_attention_dim"], u["sample_size"] = 32 * len(cfg["text"]), 16
    if "transformer_layers_per_block" in u:
        u["transformer_layers_per_block"] = tuple(1 for _ in u["transformer_layers_per_block"])
        u["addition_time_embed_dim"], u["projection_class_embeddings_input_dim"] = 8, 6 * 8 + 32
    text = [dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 **({"projection_dim": 32} if "projection_dim" in t else {})) for t in cfg["text"]]
    return dict(unet=u, text=text, vae=dict(block_out_channels=(32, 64, 64, 64), sample_size=128), norm_groups=32)


def build(arch: str, cfg: dict, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A random-weight pipeline folder with the real configs. dtype: the weights' dtype on disk
    (default fp16 on CUDA, else fp32); the modules are built in it, so building SDXL in fp16 holds
    half the memory."""
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    dtype = dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        pipe = _assemble(arch, cfg)
    finally:
        torch.set_default_dtype(before)
    pipe.to(dtype).save_pretrained(out)
    return out


def _assemble(arch: str, cfg: dict):
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from patchforge.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    groups = cfg.get("norm_groups", 32)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=groups, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=groups,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, **cfg["vae"])
    encoders = []
    for t in cfg["text"]:
        tc = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="gelu", **t)
        encoders.append((CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(tc))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=sched)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def timed_train(folder: Path, patch: Path, cache: Path) -> float:
    env = {**os.environ, "PATCHFORGE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "patchforge.cli", "train", "--concept", "style:vangogh", "--model", str(folder),
           "--out", str(patch)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf_gpu"))
    ap.add_argument("--tiny", action="store_true", help="toy widths: check the script on a CPU")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = []
    for arch in args.arch:
        cfg = {"sd15": SD15, "sdxl": SDXL}[arch]
        cfg = shrink(cfg) if args.tiny else cfg
        t0 = time.perf_counter()
        folder = build(arch, cfg, args.workdir / (arch + ("-tiny" if args.tiny else "")))
        build_s = time.perf_counter() - t0
        cache = args.workdir / f"cache-{arch}"
        shutil.rmtree(cache, ignore_errors=True)
        cold = timed_train(folder, args.workdir / f"{arch}.safetensors", cache)
        warm = timed_train(folder, args.workdir / f"{arch}.safetensors", cache)
        size = (args.workdir / f"{arch}.safetensors").stat().st_size
        name = f"{arch}{' (tiny)' if args.tiny else ''}"
        rows.append(f"| {name} | {device} | {cold:.1f} | {warm:.1f} | {size / 2**20:.2f} | {build_s:.0f} |")
    print(f"\n{time.strftime('%Y-%m-%d')}, `python benchmarks/bench_gpu.py{' --tiny' if args.tiny else ''}`: "
          "wall seconds of `patchforge train --concept style:vangogh --model FOLDER` at default settings "
          "(process start, loading, references, training, writing)\n")
    print("| pipeline | device | seconds, cold reference cache | seconds, warm | patch MiB | build s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
