"""`patchforge train`: the one training loop every erasure method shares.

    specs -> prompt sets (concepts.py) -> method.prepare() on the frozen base (reference latents,
    cached embeddings, Fisher...) -> LoRA injected through peft -> N steps of method.loss() with
    seeded timesteps/noise, AdamW, grad clipping -> forget patch written by patch_format.

A method (patchforge/methods/) only says which modules it trains, what data it needs and what its
loss is; it never owns a loop. Everything a method needs from the model goes through the Trainer
below (embed, eps, base predictions, noising), so the loop, devices and precision live in one place.

Robust training hook: every prompt embedding a method uses comes from `Trainer.embed()`, which calls
`trainer.prompt_embeddings(prompts, role)`. A robust wrapper (`--robust`, patchforge/robust.py, owned
by the evaluation/attacks side) may replace that attribute with one returning adversarially perturbed
embeddings for role == "target"; the loop and the methods need no change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .backbones import for_pipe
from .concepts import ConceptSpec, load_concept_file, merge, resolve
from .core.cache import cache_dir
from .core.cond import Cond
from .core.lora import ADAPTER, adapters_off
from .errors import PatchforgeError
from .generate import generate_latents
from .patch_format import (K_BASE_ID, K_CONCEPT, K_CONCEPTS, K_DEVICE, K_HPARAMS, K_METHOD, K_SECONDS, K_SEED,
                           model_key)

TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class TrainConfig:
    """Options shared by every method. None means: the method's own default (methods/*.py)."""
    method: str = "fmn"
    steps: int | None = None
    lr: float | None = None
    rank: int = 4
    alpha: float | None = None  # LoRA scale alpha/rank; None -> alpha = rank
    batch: int = 8
    seed: int = 0
    grad_clip: float = 1.0
    unet_targets: str | None = None  # key of TARGETS or a peft regex; None -> method default
    text_encoder: bool | None = None  # also train a text-encoder LoRA; None -> method default
    device: str | None = None
    mixed_precision: bool = True  # autocast on CUDA only
    options: dict = field(default_factory=dict)  # method hyperparameters (--set key=value)
    images: str | None = None  # folder of the concept's own images; None: the base model's generations
    progress: bool = True


def image_files(folder: str | Path) -> list[Path]:
    """The images in a `--images` folder, sorted; a clear error when there is no such folder or no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PatchforgeError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise PatchforgeError(f"--images {folder}: no .png/.jpg/.webp images in it")
    return files


class Trainer:
    """The frozen pipeline plus everything methods need: embeddings, predictions, noise, references."""

    def __init__(self, pipe, cfg: TrainConfig, device: torch.device):
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.backbone = for_pipe(pipe)  # the only thing that knows how this family's denoiser is called
        self.denoiser = self.backbone.denoiser
        self.scheduler = pipe.scheduler
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)  # all training randomness comes from here
        self.rng = random.Random(cfg.seed)
        self.train_text = False
        self._emb_cache: dict[tuple, Cond] = {}
        self.prompt_embeddings = self.encode  # the robust-training hook (see module docstring)
        self.autocast = (torch.autocast("cuda", dtype=torch.float16)
                         if device.type == "cuda" and cfg.mixed_precision else nullcontext())

    # ---- text
    def encode(self, prompts: list[str], role: str = "other") -> Cond:
        """Prompts -> Cond through the backbone's prompt encoding (not under no_grad, so a
        text-encoder LoRA trains through it). `role` tells a robust wrapper what it is encoding."""
        return self.backbone.encode(prompts, self.device)

    def embed(self, prompts: list[str], role: str = "other", base: bool = False) -> Cond:
        """Embeddings of prompts. Cached when the text encoder is frozen (or base=True) and no robust
        wrapper is installed; base=True gives the frozen text encoder's embeddings."""
        hooked = self.prompt_embeddings != self.encode
        if (base or not self.train_text) and not (hooked and role == "target" and not base):
            key = (tuple(prompts), base)
            if key not in self._emb_cache:
                with torch.no_grad(), adapters_off(self.text_encoders()) if base else nullcontext():
                    self._emb_cache[key] = self.encode(prompts, role)
            return self._emb_cache[key]
        return self.prompt_embeddings(prompts, role)

    def text_encoders(self):
        return self.backbone.text_encoders()

    # ---- denoiser
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, base: bool = False) -> torch.Tensor:
        """The denoiser's prediction (epsilon, v or velocity: whatever the base predicts). base=True: the
        frozen base model's (adapter disabled, no grad) -- the teacher of every distillation term."""
        ctx = (torch.no_grad(), adapters_off([self.denoiser])) if base else (nullcontext(), nullcontext())
        with ctx[0], ctx[1], self.autocast:
            out = self.backbone.predict(x_t, t, cond)
        return out.float()


    # ---- noise
    def noised(self, x0: torch.Tensor):
        """Random t and noise for clean latents x0 -> (x_t, t, noise), from the run's seeded generator."""
        return self.backbone.noised(x0, self.gen)

    def target(self, x0, noise, t) -> torch.Tensor:
        """The denoising loss target: epsilon, v, or a flow velocity, as the backbone was trained."""
        return self.backbone.training_target(x0, noise, t)

    def pick(self, items: list, k: int) -> list[int]:
        """k indices into items, seeded."""
        return [self.rng.randrange(len(items)) for _ in range(k)]

    # ---- reference latents, generated by the base model itself and cached on disk
    def reference_latents(self, prompts: list[str], name: str, per_prompt: int = 1) -> torch.Tensor:
        """Clean latents of base-model generations for prompts (the images FMN/ESD/SA train on when
        the user gives none). Cached in $PATCHFORGE_CACHE/refs/<model>/<name>-<hash>.safetensors."""
        from safetensors.torch import load_file, save_file

        steps, guidance = int(self.cfg.options.get("ref_steps", 10)), float(self.cfg.options.get("ref_guidance", 5.0))
        digest = hashlib.sha256(json.dumps([prompts, per_prompt, steps, guidance, self.cfg.seed]).encode()).hexdigest()[:10]
        path = cache_dir() / "refs" / model_key(self.pipe) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}-{digest}.safetensors"
        if path.exists():
            return load_file(str(path))["latents"].to(self.device, self.backbone.dtype)
        all_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [self.cfg.seed * 100003 + i for i in range(len(all_prompts))]
        with adapters_off(self.backbone.models().values()):
            latents = generate_latents(self.pipe, all_prompts, seeds, steps, guidance, size=self.backbone.native_size())
        with atomic_path(path) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompts": json.dumps(all_prompts)})
        return latents.to(self.device, self.backbone.dtype)

    def encode_images(self, folder: str | Path) -> torch.Tensor:
        """User-given reference images (`--images`) -> clean latents (VAE mean, scaled). Each image is
        centre-cropped to a square and resized to the model's resolution."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        size = self.backbone.native_size()
        files = image_files(folder)
        arr = []
        for f in files:
            try:
                im = Image.open(f).convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise PatchforgeError(f"--images: cannot read {f.name} ({e.__class__.__name__})") from None
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            arr.append(np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)))
        # in chunks: a folder of a few hundred SD-sized images must not fill memory
        return self.backbone.encode_images(np.stack(arr)).to(self.backbone.dtype)


# ---------------------------------------------------------------- LoRA injection
def inject_lora(trainer: Trainer, unet_targets: str | None, text_encoder: bool, rank: int, alpha: float) -> list:
    """Add adapter ADAPTER through peft to the chosen modules; return the trainable parameters."""
    from peft import LoraConfig

    params = []
    denoiser = trainer.denoiser
    if unet_targets:
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=trainer.backbone.target_pattern(unet_targets)), adapter_name=ADAPTER)
        denoiser.set_adapters(ADAPTER) if hasattr(denoiser, "set_adapters") else None
    if text_encoder:
        for te in trainer.text_encoders():
            te.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                      target_modules=TEXT_ENCODER), adapter_name=ADAPTER)
        trainer.train_text = True
    for model in trainer.backbone.models().values():
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if f".{ADAPTER}." in name and "lora_" in name:
                p.data = p.data.float()  # LoRA weights train in fp32 even on an fp16 base
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise PatchforgeError(f"no module of this model matches the LoRA targets '{unet_targets}'")
    return params


def remove_lora(trainer: Trainer) -> None:
    for model in trainer.backbone.models().values():
        if ADAPTER in (getattr(model, "peft_config", None) or {}):
            model.delete_adapters(ADAPTER) if hasattr(model, "delete_adapters") else model.delete_adapter(ADAPTER)


# ---------------------------------------------------------------- the loop
def train_patch(concepts, method: str = "fmn", model: str | None = None, config: TrainConfig | None = None,
                out: str | Path | None = None, pipe=None, robust=None) -> tuple[Path, dict]:
    """Train one forget patch erasing `concepts` (spec strings or ConceptSpecs) and write it.

    Returns (path, summary). `pipe` reuses an already loaded pipeline (left without the adapter
    afterwards); `robust` is an optional callable(trainer) installing the robust hook."""
    from tqdm.auto import tqdm

    from .methods import get_method
    from .patch_format import save_patch_from_pipeline
    from .pipeline_loading import load_pipeline, model_id, pick_device

    cfg = config or TrainConfig(method=method)
    cfg.method = method or cfg.method
    specs = [resolve(c) for c in (concepts if isinstance(concepts, (list, tuple)) else [concepts])]
    method_cls = get_method(cfg.method)
    hp = method_config(method_cls, cfg.options)
    steps = cfg.steps if cfg.steps is not None else hp.steps
    lr = cfg.lr if cfg.lr is not None else hp.lr
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # LoRA's gaussian init draws from the global generator
    device = pick_device(cfg.device)
    if pipe is None:
        pipe = load_pipeline(model, device=str(device))
    trainer = Trainer(pipe, cfg, device)
    if robust is not None:
        robust(trainer)
    runner = method_cls(hp, trainer, specs, merge(specs))
    runner.prepare()  # on the frozen base: references, cached embeddings, Fisher

    unet_targets = cfg.unet_targets if cfg.unet_targets is not None else hp.unet_targets
    text_encoder = cfg.text_encoder if cfg.text_encoder is not None else hp.text_encoder
    alpha = cfg.alpha if cfg.alpha is not None else float(cfg.rank)
    params = inject_lora(trainer, None if unet_targets == "none" else unet_targets, text_encoder, cfg.rank, alpha)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    try:
        runner.start()
        bar = tqdm(range(steps), desc=f"train {cfg.method}", disable=not cfg.progress, leave=False)
        for step in bar:
            if cfg.options.get("overfit_batch"):  # sanity check: the same batch every step, loss must fall
                trainer.gen.manual_seed(cfg.seed)
                trainer.rng.seed(cfg.seed)
            loss, logs = runner.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix({k: f"{float(v.detach()):.4g}" for k, v in {"loss": loss, **logs}.items()})
        runner.finish()
        seconds = time.time() - t0
        names = [s.key for s in specs]
        hparams = {"steps": steps, "lr": lr, "rank": cfg.rank, "alpha": alpha, "batch": cfg.batch,
                   "grad_clip": cfg.grad_clip, "unet_targets": unet_targets, "text_encoder": text_encoder,
                   "reference_images": "user" if cfg.images else "base model",
                   **{k: v for k, v in asdict(hp).items() if k not in ("steps", "lr")}}
        metadata = {K_CONCEPT: "; ".join(names), K_CONCEPTS: json.dumps([s.to_json() for s in specs]),
                    K_METHOD: cfg.method, K_HPARAMS: json.dumps(hparams), K_SECONDS: f"{seconds:.1f}",
                    K_DEVICE: str(device), K_SEED: str(cfg.seed), K_BASE_ID: model_id(model)}
        path = Path(out) if out else Path("patches") / default_name(specs, cfg.method)
        path.parent.mkdir(parents=True, exist_ok=True)
        path = save_patch_from_pipeline(pipe, path, adapter_name=ADAPTER, metadata=metadata)
    finally:
        remove_lora(trainer)
    size = path.stat().st_size
    summary = {"concepts": names, "method": cfg.method, "steps": steps, "seconds": round(seconds, 1),
               "bytes": size, "path": str(path), "device": str(device), "first_loss": losses[0] if losses else None,
               "last_loss": sum(losses[-5:]) / max(1, len(losses[-5:])) if losses else None, "losses": losses,
               "robust": getattr(trainer, "robust_stats", None)}  # the inner attack's cost, when --robust
    return path, summary


def default_name(specs: list[ConceptSpec], method: str) -> str:
    slug = "+".join(re.sub(r"[^a-z0-9]+", "-", f"{s.kind}-{s.name}".lower()).strip("-") for s in specs)[:80]
    return f"{slug}.{method}.safetensors"


# ---------------------------------------------------------------- CLI
LOOP_OPTIONS = ("ref_steps", "ref_guidance", "overfit_batch")  # --set keys the loop itself reads


def method_config(method_cls, options: dict):
    """The method's Config from --set options; a key that neither the method, the loop nor --robust
    (robust_*) knows is a typo, and fails with the method's options listed."""
    from .robust import RobustConfig

    fields = method_cls.Config.__dataclass_fields__
    robust = {f"robust_{k}" for k in RobustConfig.__dataclass_fields__}
    for key in options:
        if key not in fields and key not in LOOP_OPTIONS and key not in robust:
            import difflib

            known = sorted(fields) + list(LOOP_OPTIONS)
            close = difflib.get_close_matches(key, known + sorted(robust), n=1)
            raise PatchforgeError(f"--set {key}: not an option of {method_cls.name}"
                                  + (f" (did you mean {close[0]}?)" if close else "") + f"; options: {', '.join(known)}")
    return method_cls.Config(**{k: v for k, v in options.items() if k in fields})


def parse_set(items: list[str]) -> dict:
    """KEY=VALUE strings -> {key: value}, values read as JSON (numbers, true/false) or kept as words.
    The one parser for `train --set`, `attack --budget` and `bench_methods --set`."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise PatchforgeError(f"--set {item}: write KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_command(args) -> int:
    from .methods import get_method

    options = parse_set(args.set)
    method_config(get_method(args.method), options)  # unknown method or option: fail before loading
    if not args.concept and not args.concept_file:
        raise PatchforgeError("give at least one --concept KIND:NAME or a --concept-file")
    jobs = [[resolve(c, to=args.to, seed=args.seed) for c in args.concept]] if args.concept else []
    if args.concept_file:
        jobs += [[s] for s in load_concept_file(args.concept_file)]
    if args.out and len(jobs) > 1:
        raise PatchforgeError("--out names one file but the concept file trains several patches: leave --out out")
    if args.images and len(jobs) > 1:
        raise PatchforgeError("--images holds one concept's images but the concept file trains several patches")
    if args.images:
        image_files(args.images)  # a wrong folder fails before any model is loaded
    robust = None
    if args.robust:
        try:
            from .robust import wrap_trainer as robust
        except ImportError:
            raise PatchforgeError("robust training is not available in this installation (patchforge.robust missing)") from None
    rank, world, device = process_share(args.device)
    tag = f"[process {rank + 1}/{world}] " if world > 1 else ""
    mine = jobs[rank::world]
    if world > 1:
        print(f"{tag}{len(mine)} of {len(jobs)} patches on {device}", flush=True)
    cfg = TrainConfig(method=args.method, steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                      batch=args.batch, seed=args.seed, unet_targets=args.targets, text_encoder=args.text_encoder,
                      device=device, options=options, progress=not args.quiet and rank == 0,
                      images=args.images)
    pipe = None
    for specs in mine:
        if pipe is None:
            from .pipeline_loading import load_pipeline, pick_device
            pipe = load_pipeline(args.model, device=str(pick_device(device)))
        path, s = train_patch(specs, args.method, args.model, cfg, out=args.out, pipe=pipe, robust=robust)
        print(f"{tag}trained {', '.join(s['concepts'])} with {s['method']}: {s['steps']} steps in {s['seconds']} s on "
              f"{s['device']}, loss {s['first_loss']:.4g} -> {s['last_loss']:.4g}, patch {s['bytes'] / 1024:.0f} KiB -> {path}",
              flush=True)
        if s["robust"]:
            print(f"{tag}  robust: {s['robust']['inner_steps']} inner attack steps took {s['robust']['inner_seconds']:.1f} s "
                  f"of the {s['seconds']} s")
    return 0


def process_share(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device) of this process. Under `accelerate launch` or `torchrun`, which set
    RANK / WORLD_SIZE / LOCAL_RANK, the patches of a concept list are dealt out round-robin, one
    process per GPU (cuda:LOCAL_RANK): a patch is minutes of work at most, so patches in parallel
    beat one patch split over GPUs, and no process ever waits for another. A single process: (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return rank, world, device
