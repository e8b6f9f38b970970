"""`patchforge generate`: text to image on the toy model or any diffusers SD pipeline,
optionally with forget patches applied."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path

if TYPE_CHECKING:
    from PIL import Image


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


def run_command(args) -> int:
    import torch

    from .errors import PatchforgeError
    from .pipeline_loading import load_pipeline

    if args.weight and len(args.weight) != len(args.patch):  # before the model loads
        raise PatchforgeError(f"{len(args.weight)} --weight values for {len(args.patch)} --patch files: give one per patch or none")
    pipe = load_pipeline(args.model, device=args.device)
    if args.patch:
        from .loading import load_forget_patch

        for i, src in enumerate(args.patch):
            load_forget_patch(pipe, src, weight=args.weight[i] if args.weight else 1.0)
    gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.batch)]
    out = pipe([args.prompt] * args.batch, negative_prompt=[args.negative_prompt] * args.batch if args.negative_prompt else None,
               num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, output_type="np").images
    images = (out * 255).round().astype(np.uint8)
    with atomic_path(args.out) as tmp:  # a half-written picture never replaces a good one
        to_grid(images, args.grid or args.batch).save(tmp)
    print(f"wrote {args.out} ({args.batch} image(s), seed {args.seed}..{args.seed + args.batch - 1})")
    return 0
