"""`patchforge generate`: images from a base model with forget patches applied, saved as one grid."""
from __future__ import annotations

from ..core.atomic import atomic_path
from ..core.output_paths import IMAGE_SUFFIXES, check_output_file
from ..core.pipeline_loading import check_model, load_pipeline, pick_device
from ..pipeline.sampling import generate, to_grid
from ..errors import PatchforgeError
from ..io.loading import load_forget_patch


def run_command(args) -> int:
    if args.weight and len(args.weight) != len(args.patch):  # before the model loads
        raise PatchforgeError(f"{len(args.weight)} --weight values for {len(args.patch)} --patch files: give one per "
                              "patch or none")
    check_output_file(args.out, "-o", suffixes=IMAGE_SUFFIXES)
    check_model(args.model)
    pick_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    if args.patch:
        for i, src in enumerate(args.patch):
            load_forget_patch(pipe, src, weight=args.weight[i] if args.weight else 1.0)
    images = generate(pipe, [args.prompt] * args.batch, [args.seed + i for i in range(args.batch)],
                      negative=[args.negative_prompt] * args.batch if args.negative_prompt else None,
                      batch=args.batch, steps=args.steps, guidance=args.guidance)
    with atomic_path(args.out) as tmp:  # a half-written picture never replaces a good one
        to_grid(images, args.grid or args.batch).save(tmp)
    print(f"wrote {args.out} ({args.batch} image(s), seed {args.seed}..{args.seed + args.batch - 1})")
    return 0
