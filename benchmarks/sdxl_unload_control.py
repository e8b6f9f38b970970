"""Is a bf16 SDXL-sized pipeline bit-identical after a forget patch is loaded and unloaded, and if not,
is the difference patchforge's or the CPU kernels' run-to-run behaviour?

One SDXL-sized random-weight pipeline (benchmarks/bench_gpu.py's config, fp16 on disk) loaded in bf16,
deterministic algorithms on, 256 px, 2 denoising steps (--size, --steps), one seed. Outputs compared (largest absolute
latent difference, and whether every weight is bit-identical):

    base vs base                 the same pipeline run twice
    base vs weights moved        every weight copied to fresh memory (values unchanged, no patch): the
                                 no-patch control for memory placement
    base vs patch unloaded       a random forget patch (UNet K/V + both text encoders, random A and B)
                                 loaded with load_forget_patch and unloaded again

    python benchmarks/sdxl_unload_control.py [--workdir /tmp/pf_real] [--tiny]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_gpu import SDXL, build, shrink


def weights_digest(pipe) -> str:
    h = hashlib.sha256()
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for name, t in getattr(pipe, comp).state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def latents(pipe, steps: int, size: int) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(0)
    return pipe("a painting of a lighthouse", num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                generator=gen, output_type="latent").images.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf_real"))
    ap.add_argument("--tiny", action="store_true", help="toy widths: checks the script, its numbers mean nothing")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps per output (bf16 on a CPU: minutes each)")
    ap.add_argument("--size", type=int, default=256, help="pixels")
    args = ap.parse_args()
    from diffusers import StableDiffusionXLPipeline

    import patchforge.io.loading as pf
    from tiny_pipelines import make_patch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    folder = build("sdxl", shrink(SDXL) if args.tiny else SDXL, args.workdir / ("sdxl-tiny" if args.tiny else "sdxl"),
                   dtype=torch.float16)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    patch = make_patch(pipe, args.workdir / "sdxl-random-patch.safetensors", "random", scale=0.05,
                       targets=["attn2.to_k", "attn2.to_v"])
    digest, base = weights_digest(pipe), latents(pipe, args.steps, args.size)
    rows = [("base vs base", latents(pipe, args.steps, args.size), weights_digest(pipe))]
    with torch.no_grad():
        for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
            for p in getattr(pipe, comp).parameters():
                p.data = p.data.clone()  # the same values in fresh memory
    rows.append(("base vs weights moved (no patch)", latents(pipe, args.steps, args.size), weights_digest(pipe)))
    name = pf.load_forget_patch(pipe, patch)
    patched = latents(pipe, args.steps, args.size)
    pf.unload_forget_patch(pipe, name)
    rows.append(("base vs patch unloaded", latents(pipe, args.steps, args.size), weights_digest(pipe)))
    print(f"patched vs base: largest difference {float((patched - base).abs().max()):.4g} (the patch acts)")
    print("| comparison | largest latent difference | weights bit-identical |\n|---|---|---|")
    for label, out, d in rows:
        print(f"| {label} | {float((out - base).abs().max()):.4g} | {d == digest} |")


if __name__ == "__main__":
    main()
