"""Probes of the world-v2 UNet build's budget: would more steps, or a better start, reach the base-rate bars?

Two experiments, each writing a v2 model folder (`pipeline/` + the judges of MODEL) for
`patchforge toy report --model OUT/pipeline --seeds 4`:

    # more samples: continue MODEL's shipped (EMA) weights, constant LR, and snapshot the EMA
    python benchmarks/v2_build_probes.py continue --model models/toy-v2 --steps 3000 --snapshots 1500,3000 --out DIR

    # a better start, A/B at equal steps: a fresh UNet + text encoder on MODEL's VAE and tokenizer,
    # with the v2 build's settings (batch 64, lr 6e-4 on the 5 500-step cosine), and
    #   base: as the build does it;  lr: lr 1.5e-3;  pre: the text encoder first learns to read every
    #   label of a scene from its caption (linear heads on its pooled output, --pretrain-steps at batch 128)
    python benchmarks/v2_build_probes.py arm base --model models/toy-v2 --steps 1200 --out DIR

Both use one thread per process by default (run arms side by side on a 2-core machine). Prints a line
every 100 steps and the seconds spent; the result is in the report of each OUT.
"""
import argparse
import copy
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from patchforge.toyworld import world_v2 as wm
from patchforge.toyworld.build import (LatentDataset, cosine_lr, denoiser_loss, ema_step, encode_posteriors,
                                       make_components, min_snr_weights, random_scenes, render_images, sample_batch)


def encoded_dataset(vae, seed: int, size: int = 40_000) -> tuple[LatentDataset, random.Random]:
    """v2 scenes rendered and encoded by the model's VAE, as a build does (its seed's torch and Python RNGs)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes = random_scenes(wm, rng, size)
    means, stds = encode_posteriors(vae, render_images(scenes, rng, wm.render))
    return LatentDataset(scenes, means, stds, vae.config.scaling_factor), rng


def pretrain_text_encoder(text_encoder, tokenizer, data: LatentDataset, rng, steps: int) -> None:
    """Teach the text encoder to say what a caption describes: cross-entropy of linear heads on its pooled
    output against every label of the captioned scene (labels a caption leaves out: their prior)."""
    kinds = list(wm.LABELS)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(text_encoder.config.hidden_size, len(wm.LABELS[k]))
                                 for k in kinds})
    index = {k: {v: i for i, v in enumerate(wm.LABELS[k])} for k in kinds}
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(heads.parameters()), 1e-3, weight_decay=1e-2)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data.scenes), (128,)).tolist()
        ids = tokenizer([wm.caption(data.scenes[i], rng, "any") for i in idx], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        pooled = text_encoder(ids).pooler_output
        labels = [data.scenes[i].labels() for i in idx]
        loss = sum(F.cross_entropy(heads[k](pooled), torch.tensor([index[k][lab[k]] for lab in labels]))
                   for k in kinds)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"pretrain {step} loss {loss.item():.3f} {time.time() - t0:.0f} s", flush=True)


def train(unet, text_encoder, vae, tokenizer, scheduler, data, rng, steps: int, opt, lr_schedule, ema_warmup: bool,
          snapshots: dict[int, Path], model: Path) -> None:
    """The build's UNet + text encoder loop (with its EMA); after step N in snapshots, the EMA is saved as
    a v2 model folder snapshots[N] (with MODEL's judges)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    snr_weight = min_snr_weights(scheduler, 5.0)
    t0 = time.time()
    for step in range(steps):
        latents, texts = sample_batch(data, rng, wm, 64, 0.1)
        loss = denoiser_loss(unet, text_encoder, tokenizer, scheduler, latents, texts, snr_weight)
        # an EMA that starts from trained weights is not warmed up: a huge step makes it 0.999 at once
        ema_step(loss, opt, lr_schedule, params, ema_params, 0.999, step if ema_warmup else 10**9)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f} s", flush=True)
        if step + 1 in snapshots:
            out = snapshots[step + 1]
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            pipe.save_pretrained(out / "pipeline", safe_serialization=True)
            shutil.copy(model / "judges.safetensors", out / "judges.safetensors")
            print(f"saved {out}", flush=True)
    print(f"trained {steps} steps in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["continue", "arm"])
    ap.add_argument("arm", nargs="?", choices=["base", "lr", "pre"], default="base")
    ap.add_argument("--model", type=Path, default=Path("models/toy-v2"), help="a v2 build folder")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--snapshots", default="", help="continue: steps to save the EMA at (default: the last)")
    ap.add_argument("--lr", type=float, default=3e-4, help="continue: the constant learning rate")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = StableDiffusionPipeline.from_pretrained(args.model / "pipeline")
    vae, tokenizer, scheduler = base.vae, base.tokenizer, base.scheduler
    if args.experiment == "continue":
        data, rng = encoded_dataset(vae, seed=1)  # not the build's seed 0: scenes it did not see
        unet, text_encoder = base.unet.train().requires_grad_(True), base.text_encoder.train().requires_grad_(True)
        opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), args.lr, weight_decay=1e-2)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        snaps = {int(s) for s in args.snapshots.split(",") if s} or {args.steps}
        snapshots = {step: args.out / f"step{step}" for step in snaps}
        ema_warmup = False
    else:
        data, rng = encoded_dataset(vae, seed=0)
        torch.manual_seed(0)
        _, unet, text_encoder, _ = make_components(tokenizer, 32, (32, 64))
        if args.arm == "pre":
            pretrain_text_encoder(text_encoder, tokenizer, data, rng, args.pretrain_steps)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, 1.5e-3 if args.arm == "lr" else 6e-4, weight_decay=1e-2)
        lr_schedule = cosine_lr(opt, 5500)  # the v2 build's schedule: these steps are its first ones
        snapshots = {args.steps: args.out}
        ema_warmup = True
    train(unet, text_encoder, vae, tokenizer, scheduler, data, rng, args.steps, opt, lr_schedule, ema_warmup,
          snapshots, args.model)


if __name__ == "__main__":
    main()
