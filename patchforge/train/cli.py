"""`patchforge train` on the command line: arguments -> TrainConfig, checked once before any model loads,
the concept jobs dealt out (one patch per job; several processes under accelerate/torchrun), each job
resolved into its RunSpec and run by the shared loop (train/loop.py), one summary line per patch."""
from __future__ import annotations

import os
import time

import torch

from ..core.concepts import load_concept_file, resolve
from ..pipeline.concept_worlds import concept_world
from ..errors import PatchforgeError
from .loop import OPTION_ALIASES, TrainConfig, check_train_args, model_facts, prepare_run, resolve_run, run_spec


def run_command(args) -> int:
    cfg = TrainConfig(method=args.method, steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                      batch=args.batch, seed=args.seed, denoiser_targets=args.targets,
                      text_encoder=args.text_encoder, options=dict(args.set), progress=not args.quiet,
                      images=args.images, resolution=args.resolution, ref_images=args.ref_images,
                      gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                      max_memory_gib=args.max_memory, robust=args.robust, fast=args.fast)
    hp = check_train_args(cfg, model=args.model, out=args.out, concept_file=args.concept_file)  # before any load
    for old, new in OPTION_ALIASES.items():
        if any(key == old for key, _ in args.set):
            print(f"note: --set {old} is now called {new} (the old name still works)")
    if args.device:
        from ..core.pipeline_loading import pick_device

        pick_device(args.device)
    if not args.concept and not args.concept_file:
        raise PatchforgeError("give at least one --concept KIND:NAME or a --concept-file")
    world_name = concept_world(args.model)
    jobs = ([[resolve(c, to=args.to, seed=args.seed, world_name=world_name) for c in args.concept]]
            if args.concept else [])
    if args.concept_file:
        jobs += [[s] for s in load_concept_file(args.concept_file, world_name=world_name)]
    if args.one_patch:
        jobs = [[s for job in jobs for s in job]]
    if args.out and len(jobs) > 1:
        raise PatchforgeError("--out names one file but the concept file trains several patches: leave --out out")
    if args.images and len(jobs) > 1:
        raise PatchforgeError("--images holds one concept's images but the concept file trains several patches")
    robust = None
    if args.robust:
        try:
            from .robust import wrap_trainer as robust
        except ImportError:
            raise PatchforgeError("robust training is not available in this installation (patchforge.train.robust "
                                  "missing)") from None
    rank, world_size, device = process_share(args.device)
    tag = f"[process {rank + 1}/{world_size}] " if world_size > 1 else ""
    mine = jobs[rank::world_size]
    if world_size > 1:
        print(f"{tag}{len(mine)} of {len(jobs)} patches on {device}", flush=True)
    cfg.device, cfg.progress = device, cfg.progress and rank == 0
    if args.dry_run:
        facts = model_facts(args.model)
        if facts is None:
            raise PatchforgeError(f"--dry-run: nothing to plan from before loading '{args.model}' (not a folder, "
                                  "not in the Hub cache)")
        print(resolve_run(mine[0] if mine else [], cfg, hp, facts, model=args.model).plan.line(args.method))
        return 0
    pipe, t_all, written = None, time.time(), []
    for specs in mine:  # one model load for all of them; each later plan is made on the loaded pipeline
        spec, pipe = prepare_run(specs, cfg, hp, model=args.model, out=args.out, pipe=pipe)
        path, s = run_spec(spec, pipe, robust)
        print(f"{tag}{summary_line(s)} -> {path}", flush=True)
        written.append(s)
        if s["robust"]:
            print(f"{tag}  robust: {s['robust']['inner_steps']} inner attack steps took "
                  f"{s['robust']['inner_seconds']:.1f} s of the {s['seconds']} s")
    if len(written) > 1:
        print(f"{tag}{len(written)} patches, {sum(len(s['concepts']) for s in written)} concepts in "
              f"{time.time() - t_all:.1f} s (one model load; {sum(s['bytes'] for s in written) / 1024:.0f} KiB)")
    return 0


def summary_line(s: dict) -> str:
    """One line for a written patch: steps and loss, or the closed form's rank and residual."""
    if s["solve"]:
        how = (f"solved in closed form in {s['seconds_to_written']:.2f} s on {s['device']}: rank {s['rank']}, "
               f"residual {s['solve']['residual']:.2%} of the exact edit")
    else:
        how = (f"{s['steps']} steps in {s['seconds']} s on {s['device']} ({s['prepare_seconds']} s references, "
               f"{s['step_seconds']} s/step, peak RSS {s['peak_rss_gib']:.1f} GiB, expected "
               f"{s['expected_peak_gib']:.1f}), loss "
               + (f"{s['first_loss']:.4g} -> {s['last_loss']:.4g}" if s["losses"] else "n/a"))
    return f"trained {', '.join(s['concepts'])} with {s['method']}: {how}, patch {s['bytes'] / 1024:.0f} KiB"


def process_share(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device) of this process. Under `accelerate launch` or `torchrun`, which set
    RANK / WORLD_SIZE / LOCAL_RANK, the patches of a concept list are dealt out round-robin, one
    process per GPU (cuda:LOCAL_RANK): a patch is minutes of work at most, so patches in parallel
    beat one patch split over GPUs, and no process ever waits for another. A single process: (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return rank, world_size, device
