"""Text to image: the one generation routine every command uses (`patchforge generate`, eval, attacks),
on the toy model or any diffusers pipeline, optionally with forget patches applied."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch


if TYPE_CHECKING:
    from PIL import Image

STEPS, GUIDANCE = 20, 5.0  # what every patchforge command generates with
SEED0 = 1000  # eval's image seeds are SEED0 + 0..seeds-1, the same for base and patched


def generate(pipe, prompts: list[str], seeds: list[int], negative: list[str] | None = None,
             prompt_embeds: torch.Tensor | None = None, batch: int = 32, steps: int | None = None,
             guidance: float | None = None, pooled_embeds: torch.Tensor | None = None) -> np.ndarray:
    """One image per (prompt, seed): uint8 NHWC. Each image has its own generator, so it depends only
    on its prompt and seed, never on batch composition. `prompt_embeds` (N,L,D) replaces prompts, with
    `pooled_embeds` (N,D') for the families that also condition on a pooled embedding (SDXL, SD3, FLUX).
    steps / guidance: default STEPS / GUIDANCE of this module, read at call time."""
    steps, guidance = steps or STEPS, GUIDANCE if guidance is None else guidance
    out = []
    for i in range(0, len(seeds), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        kw = {}
        if prompt_embeds is not None:
            from ..backbones import for_pipe

            kw["prompt_embeds"] = prompt_embeds[i:i + batch]
            with torch.no_grad():
                neg = for_pipe(pipe).encode(negative[i:i + batch] if negative else [""] * len(gens), pipe.device)
            kw["negative_prompt_embeds"] = neg.emb
            if pooled_embeds is not None:
                kw["pooled_prompt_embeds"] = pooled_embeds[i:i + batch]
                kw["negative_pooled_prompt_embeds"] = neg.pooled
        else:
            kw["prompt"] = prompts[i:i + batch]
            if negative:
                kw["negative_prompt"] = negative[i:i + batch]
        with torch.no_grad():
            images = pipe(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np",
                          **kw).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def generate_latents(pipe, prompts: list[str], seeds: list[int], steps: int | None = None,
                     guidance: float | None = None, size: int | None = None, batch: int = 16) -> torch.Tensor:
    """Clean latents of generations, one per (prompt, seed), float32 on the CPU: what methods train on
    and attacks start from. `size`: pixels of the image side (default: the pipeline's)."""
    steps, guidance = steps or STEPS, GUIDANCE if guidance is None else guidance
    side = {"height": size, "width": size} if size else {}
    out = []
    for i in range(0, len(seeds), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        with torch.no_grad():
            out.append(pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            output_type="latent", **side).images.float().cpu())
    return torch.cat(out)


def encode_prompts(pipe, n: int, texts: list[str] | None = None) -> torch.Tensor:
    """Text-encoder output of "" (or of `texts`): the unconditional branch of guidance."""
    from ..backbones import for_pipe

    return for_pipe(pipe).encode(texts or [""] * n, pipe.device).emb


def to_grid(images: np.ndarray, cols: int, min_side: int = 128) -> "Image.Image":
    """uint8 NHWC -> one PIL grid; tiny images are enlarged (nearest) so people can see them."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    img = Image.fromarray(canvas)
    scale = max(1, min_side // min(h, w))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
