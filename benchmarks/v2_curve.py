"""A point of the v2 build's learning curve: a build checkpoint (or a copy of one) as a toy model folder.

    python benchmarks/v2_curve.py CHECKPOINT --out DIR [--judges models/toy-v2/judges.safetensors]
    patchforge toy report --model DIR/pipeline --seeds 4 --json DIR/report.json

The folder holds the checkpoint's EMA UNet and text encoder (what the finished build saves), its VAE with
the scaling factor the build computes (the std of the whole dataset's latent means: the dataset is
re-rendered from the checkpoint's seed and size), and judges. The build trains its own judges only at its
end, so a curve point borrows the given ones (default: the shipped v2 model's, trained on decoded images of
another VAE of the same shape): a small, constant bias along the curve, stated beside it in docs/toy-model.md.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchforge.toyworld import checkpoint  # noqa: E402
from patchforge.toyworld.build import (WORLD_BUILD, encode_posteriors, make_components,  # noqa: E402
                                       random_scenes, render_images, sd_pipeline)
from patchforge.toyworld.judges import WORLDS  # noqa: E402
from patchforge.toyworld.tokenizer import build_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--judges", type=Path, default=Path("models/toy-v2/judges.safetensors"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with safe_open(str(args.checkpoint), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    cfg = meta["extra"]["config"]
    wm, (vae_blocks, max_tokens) = WORLDS[cfg["world"]], WORLD_BUILD[cfg["world"]]
    tokenizer = build_tokenizer(wm.vocabulary(), max_tokens)
    vae, unet, text_encoder, scheduler = make_components(tokenizer, wm.IMAGE_SIZE, vae_blocks)
    checkpoint.load(args.checkpoint, {"vae": vae, "ema_unet": unet, "ema_text": text_encoder}, {}, random.Random())
    # the build's own order of draws: the scenes first, then their renders, from Random(seed)
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    images = render_images(random_scenes(wm, rng, cfg["dataset_size"]), rng, wm.render)
    means, _ = encode_posteriors(vae.eval(), images)
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))

    pipe = sd_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval(), scheduler)
    pipe.save_pretrained(args.out / "pipeline", safe_serialization=True)
    shutil.copy(args.judges, args.out / "judges.safetensors")
    (args.out / "curve_point.json").write_text(json.dumps({"step": meta["step"], "unet_loss": meta["extra"].get(
        "unet_loss"), "config": cfg, "judges": args.judges.name}, indent=1))
    print(f"step {meta['step']}: {args.out}/pipeline (scaling factor {vae.config.scaling_factor:.5f})")


if __name__ == "__main__":
    main()
