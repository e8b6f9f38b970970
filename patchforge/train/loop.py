"""The one training loop every erasure method shares, and the run spec it runs.

    arguments checked (check_train_args) -> one frozen RunSpec (resolve_run: concepts, the method's
    config, the memory plan, steps, lr, targets) -> method.prepare() on the frozen base (reference
    latents, cached embeddings, Fisher...) -> LoRA injected through peft -> N steps of method.loss()
    with seeded timesteps/noise, AdamW, grad clipping -> forget patch written (io/saving.py).

A method (patchforge/methods/) only says which modules it trains, what data it needs and what its
loss is; it never owns a loop. Everything a method needs from the model goes through the Trainer
below (embed, predict, base predictions, noising), so the loop, devices and precision live in one place.

Robust training hook: every prompt embedding a method uses comes from `Trainer.embed()`, which calls
`trainer.prompt_embeddings(prompts, role)`. A robust wrapper (`--robust`, patchforge/train/robust.py) may
replace that attribute with one returning adversarially perturbed
embeddings for role == "target"; the loop and the methods need no change.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..backbones import Cond, for_pipe
from ..core.atomic import atomic_path
from ..core.cache import cache_dir
from ..core.concepts import ConceptSpec, list_alternatives, merge, resolve
from ..core.lora import ADAPTER, adapters_off
from ..core.output_paths import check_output_file
from ..core.pipeline_loading import (check_model, hub_repo_id, load_pipeline, local_folder, pick_device,
                                     public_model_id)
from ..errors import PatchforgeError
from ..io.fingerprint import model_key
from ..io.patch_format import (K_BASE_ID, K_BASE_REPO_ID, K_CONCEPT, K_CONCEPTS, K_DEVICE, K_HPARAMS, K_METHOD,
                               K_SECONDS, K_SEED)
from ..io.saving import save_patch_from_pipeline
from ..methods import get_method
from ..pipeline.concept_worlds import concept_world
from ..pipeline.plan import ModelFacts, make_plan, peak_rss
from ..pipeline.sampling import generate_latents
from .robust import RobustConfig

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
    denoiser_targets: str | None = None  # key of TARGETS or a peft regex; None -> method default
    text_encoder: bool | None = None  # also train a text-encoder LoRA; None -> method default
    device: str | None = None
    mixed_precision: bool = True  # autocast on CUDA only
    options: dict = field(default_factory=dict)  # method hyperparameters (--set key=value)
    robust: bool = False  # adversarial training (--robust): the method's ROBUST defaults apply
    fast: bool = False  # --fast: the method's FAST defaults apply
    images: str | None = None  # folder of the concept's own images; None: the base model's generations
    progress: bool = True
    # None in the four below: the family's default (its Backbone's RELEASES; the toy's: what it always used)
    resolution: int | None = None  # pixels of training and reference images
    ref_images: int | None = None  # reference images the base model generates (the method's n_refs)
    gradient_checkpointing: bool | None = None  # None: on only when the run would not fit without it
    precision: str = "auto"  # auto, fp32, bf16, fp16: the frozen base's dtype; LoRA weights stay fp32
    max_memory_gib: float | None = None  # memory the run may use; None: what the device has free

    def __post_init__(self):  # --set keys under their old names mean the new ones
        self.options = {OPTION_ALIASES.get(k, k): v for k, v in self.options.items()}


OPTION_ALIASES = {"unet_targets": "denoiser_targets"}  # old --set key -> its name now (renamed 2026-12-07)


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
    def __init__(self, pipe, cfg: TrainConfig, device: torch.device, resolution: int | None = None):
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.backbone = for_pipe(pipe)  # the only thing that knows how this family's denoiser is called
        self.denoiser = self.backbone.denoiser
        self.native = self.backbone.native_size()
        self.size = resolution or self.native  # pixels of reference images and of SDXL's size conditioning
        self.scheduler = pipe.scheduler
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)  # all training randomness comes from here
        self.rng = random.Random(cfg.seed)
        self.train_text = False
        self._emb_cache: dict[tuple, Cond] = {}
        self.prompt_embeddings = self.encode  # the robust-training hook (see module docstring)
        dtype = self.backbone.dtype
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        self.autocast = (torch.autocast("cuda", dtype=half)
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
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, base: bool = False) -> torch.Tensor:
        """The denoiser's prediction (epsilon, v or velocity: whatever the base predicts). base=True: the
        frozen base model's (adapter disabled, no grad) -- the teacher of every distillation term."""
        ctx = (torch.no_grad(), adapters_off([self.denoiser])) if base else (nullcontext(), nullcontext())
        with ctx[0], ctx[1], self.autocast:
            out = self.backbone.predict(x_t, t, cond, size=self.size)
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
        steps, guidance = int(self.cfg.options.get("ref_steps", 10)), float(self.cfg.options.get("ref_guidance", 5.0))
        key = [prompts, per_prompt, steps, guidance, self.cfg.seed] + ([self.size] if self.size != self.native else [])
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
        path = cache_dir() / "refs" / model_key(self.pipe) / f"{stem}-{digest}.safetensors"
        if path.exists():
            return load_file(str(path))["latents"].to(self.device, self.backbone.dtype)
        all_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [self.cfg.seed * 100003 + i for i in range(len(all_prompts))]
        with adapters_off(self.backbone.models().values()):
            latents = generate_latents(self.pipe, all_prompts, seeds, steps, guidance, size=self.size)
        with atomic_path(path) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompts": json.dumps(all_prompts)})
        return latents.to(self.device, self.backbone.dtype)

    def encode_images(self, folder: str | Path) -> torch.Tensor:
        """User-given reference images (`--images`) -> clean latents (VAE mean, scaled). Each image is
        centre-cropped to a square and resized to the model's resolution."""
        size = self.size
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
def inject_lora(trainer: Trainer, denoiser_targets: str | None, text_encoder: bool, rank: int, alpha: float) -> list:
    """Add adapter ADAPTER through peft to the chosen modules; return the trainable parameters."""
    params = []
    denoiser = trainer.denoiser
    if denoiser_targets:
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=trainer.backbone.target_pattern(denoiser_targets))
        try:
            denoiser.add_adapter(config, adapter_name=ADAPTER)
        except ValueError:  # PEFT: "Target modules ... not found in the base model"
            raise PatchforgeError(f"--targets {denoiser_targets[:40]!r} matches no module of this model's denoiser: "
                                  f"give one of {', '.join(TARGET_SETS)} or a regex of its module names") from None
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
        raise PatchforgeError(f"no module of this model matches the LoRA targets '{denoiser_targets}'")
    return params


def remove_lora(trainer: Trainer) -> None:
    for model in trainer.backbone.models().values():
        if ADAPTER in (getattr(model, "peft_config", None) or {}):
            model.delete_adapters(ADAPTER) if hasattr(model, "delete_adapters") else model.delete_adapter(ADAPTER)


# ---------------------------------------------------------------- argument checks
def check_train_args(cfg: TrainConfig, *, model: str | None = None, out: str | Path | None = None,
                     concept_file: str | None = None) -> object:
    """Every argument of a training run checked before any model loads, each failure one line.
    The CLI and train_patch() both call it. Returns the method's Config (see method_config)."""
    _positive_int("--steps", cfg.steps)
    _positive_int("--rank", cfg.rank)
    _positive_int("--batch", cfg.batch)
    _positive_int("--ref-images", cfg.ref_images)
    _positive_int("--resolution", cfg.resolution)
    check_targets(cfg.denoiser_targets)
    if cfg.resolution is not None and cfg.resolution % 8:
        raise PatchforgeError(f"--resolution {cfg.resolution}: must be a multiple of 8 (the VAE's scale)")
    for flag, value in (("--lr", cfg.lr), ("--alpha", cfg.alpha), ("grad_clip", cfg.grad_clip),
                        ("--max-memory", cfg.max_memory_gib)):
        if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise PatchforgeError(f"{flag} {value}: must be a finite number > 0")
    if cfg.precision not in PRECISIONS:
        raise PatchforgeError(f"--precision {cfg.precision}: choose one of {', '.join(PRECISIONS)}")
    hp = method_config(get_method(cfg.method), cfg.options)  # unknown method, unknown or mistyped --set
    if model is not None:
        check_model(model)
    if concept_file is not None and not Path(concept_file).is_file():
        what = "not a file" if Path(concept_file).exists() else "no such file"
        raise PatchforgeError(f"--concept-file {concept_file}: {what}")
    if cfg.images:
        image_files(cfg.images)
    if out is not None:
        check_output_file(out, "--out", folder_ok=True)
    return hp


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TARGET_SETS = ("xattn", "xattn-kv", "xattn-kv+pooled", "text-in", "none")  # every backbone's TARGETS keys


def check_targets(targets: str | None) -> None:
    """--targets: a named set, or a regex PEFT can compile (whether it matches a module is known only
    once the model is loaded: inject_lora says so then)."""
    if targets is None or targets in TARGET_SETS:
        return
    try:
        re.compile(targets)
    except (re.error, RecursionError, OverflowError) as err:
        raise PatchforgeError(f"--targets {targets[:40]!r}: not one of {', '.join(TARGET_SETS)} and not a valid "
                              f"regex ({err})") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(flag: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise PatchforgeError(f"{flag} {value}: must be a whole number >= 1")


# ---------------------------------------------------------------- a run, resolved once
@dataclass(frozen=True)
class RunSpec:
    """Everything one training run will do, resolved once before any work (resolve_run); run_spec only
    runs it. `cfg` holds the final steps, lr, batch and resolution; `hp` the method's Config with the
    --robust and family defaults applied and the plan's reference-image count."""
    cfg: TrainConfig
    hp: object
    specs: tuple[ConceptSpec, ...]
    plan: object  # pipeline.plan.RunPlan
    device: torch.device
    targets: str | None  # the denoiser's LoRA targets (a TARGETS key or a regex); "none": no denoiser LoRA
    text_encoder: bool
    out: Path
    source: str | None  # the model as the user named it (only its public id reaches the patch)

    @property
    def method_cls(self):
        return get_method(self.cfg.method)


def resolve_run(concepts, cfg: TrainConfig, hp, facts, *, model: str | None = None, out=None,
                loaded: bool = False, source: str | None = None, device: torch.device | None = None) -> RunSpec:
    """The run's one spec. `hp`: check_train_args' result; `facts`: the base's ModelFacts, read before
    loading where its folder tells enough; `model`: as the user named it (None: the default), which picks
    the concept world; `source`: what the patch records as its base (default: `model`); `device`: plan for
    this device instead of cfg.device's (the benchmarks plan for GPUs they lack). Refuses a run that cannot
    fit (make_plan)."""
    method_cls = get_method(cfg.method)
    device = device or pick_device(cfg.device)
    world_name = concept_world(model, family=facts.family)
    concepts = concepts if isinstance(concepts, (list, tuple)) else [concepts]
    specs = list_alternatives(tuple(resolve(c, world_name=world_name) for c in concepts), world_name)
    hp = family_config(hp, cfg, facts)
    steps = cfg.steps if cfg.steps is not None else hp.steps
    plan = make_plan(facts, device, precision=cfg.precision, resolution=cfg.resolution, batch=cfg.batch,
                     ref_images=cfg.ref_images, checkpointing=cfg.gradient_checkpointing,
                     rows=lambda b: method_cls.denoiser_rows(hp, b), hardening=lambda b: method_cls.hardening(hp, b),
                     steps=steps, ref_steps=int(cfg.options.get("ref_steps", 10)),
                     max_memory_gib=cfg.max_memory_gib, loaded=loaded,
                     method_n_refs=hp.n_refs, user_n_refs="n_refs" in cfg.options)
    targets = cfg.denoiser_targets if cfg.denoiser_targets is not None else hp.denoiser_targets
    return RunSpec(
        cfg=replace(cfg, steps=steps, lr=cfg.lr if cfg.lr is not None else hp.lr, batch=plan.batch,
                    resolution=plan.resolution),
        # the method reads the run's targets from its config (a closed form edits the layers they name)
        hp=replace(hp, n_refs=plan.ref_images, denoiser_targets=targets), specs=specs, plan=plan, device=device,
        targets=targets,
        text_encoder=cfg.text_encoder if cfg.text_encoder is not None else hp.text_encoder,
        out=Path(out) if out else Path("patches") / default_name(specs, cfg.method),
        source=source if source is not None else model)


def prepare_run(concepts, cfg: TrainConfig, hp, *, model: str | None = None, out=None, pipe=None):
    """(RunSpec, pipeline): planned before loading where the model's folder tells enough (a run that
    cannot fit is refused before gigabytes load), else on the loaded pipeline; `pipe` reuses one."""
    facts = ModelFacts.from_pipe(pipe) if pipe is not None else model_facts(model)
    if facts is None:  # a Hub id not in the cache: nothing to read before loading
        pipe = load_pipeline(model, device=str(pick_device(cfg.device)))
        facts = ModelFacts.from_pipe(pipe)
    source = model if model is not None else getattr(pipe, "name_or_path", None)
    spec = resolve_run(concepts, cfg, hp, facts, model=model, out=out, loaded=pipe is not None, source=source)
    if pipe is None:
        pipe = load_pipeline(model, device=str(spec.device), dtype=spec.plan.dtype)
    return spec, pipe


def train_patch(concepts, method: str = "fmn", model: str | None = None, config: TrainConfig | None = None,
                out: str | Path | None = None, pipe=None, robust=None) -> tuple[Path, dict]:
    """Train one forget patch erasing `concepts` (spec strings or ConceptSpecs) and write it: the Python
    entry point (check, resolve, load, run). Returns (path, summary). `pipe` reuses an already loaded
    pipeline (left without the adapter afterwards); `robust` is an optional callable(trainer)
    installing the robust hook."""
    cfg = replace(config or TrainConfig(), method=method or (config.method if config else "fmn"))
    cfg = replace(cfg, robust=cfg.robust or robust is not None)
    hp = check_train_args(cfg, model=None if pipe is not None else model, out=out)
    spec, pipe = prepare_run(concepts, cfg, hp, model=model, out=out, pipe=pipe)
    return run_spec(spec, pipe, robust)


def run_spec(spec: RunSpec, pipe, robust=None) -> tuple[Path, dict]:
    """The shared loop: method.prepare() on the frozen base, LoRA injected, cfg.steps of method.loss()
    (or the closed form's solve), the patch written. Returns (path, summary)."""
    cfg, hp, plan = spec.cfg, spec.hp, spec.plan
    t0 = time.time()
    if cfg.progress:
        print(plan.line(cfg.method), flush=True)
    torch.manual_seed(cfg.seed)  # LoRA's gaussian init draws from the global generator
    trainer = Trainer(pipe, cfg, spec.device, resolution=plan.resolution)
    if robust is not None:
        robust(trainer)
    runner = spec.method_cls(hp, trainer, list(spec.specs), merge(list(spec.specs)))
    t_prep = time.time()
    runner.prepare()  # on the frozen base: references, cached embeddings, Fisher
    prepare_seconds = time.time() - t_prep

    steps, targets, text_encoder = cfg.steps, spec.targets, spec.text_encoder
    closed = runner.closed_form  # solved, not trained: its rank comes from the solution, no steps
    rank = runner.lora_rank() or cfg.rank
    if closed:
        steps, text_encoder = 0, False
    alpha = cfg.alpha if cfg.alpha is not None else float(rank)
    params = inject_lora(trainer, None if targets == "none" else targets, text_encoder, rank, alpha)
    if plan.checkpointing:
        trainer.denoiser.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses, solved = [], {}
    try:
        runner.start()
        if closed:
            solved = runner.solve(alpha / rank)
        t_loop = time.time()
        # disable=None: tqdm draws only on a terminal, so logs and pipes get the plan line and the summary
        bar = tqdm(range(steps), desc=f"train {cfg.method}", disable=None if cfg.progress else True, leave=False)
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
        step_seconds = (time.time() - t_loop) / max(1, steps)
        runner.finish()
        seconds = time.time() - t0
        names = [s.key for s in spec.specs]
        hparams = {"steps": steps, "lr": cfg.lr, "rank": rank, "alpha": alpha, "batch": cfg.batch,
                   "grad_clip": cfg.grad_clip, "denoiser_targets": targets, "text_encoder": text_encoder,
                   "reference_images": "user" if cfg.images else "base model",
                   **({"resolution": plan.resolution} if plan.resolution != trainer.native else {}),
                   **{k: v for k, v in asdict(hp).items() if k not in ("steps", "lr", "denoiser_targets",
                                                                         "text_encoder")},  # resolved above
                   **{f"solve_{k}": v for k, v in solved.items()}}  # closed form: rank and residual error
        metadata = patch_metadata(spec, hparams, seconds)
        spec.out.parent.mkdir(parents=True, exist_ok=True)
        path = save_patch_from_pipeline(pipe, spec.out, adapter_name=ADAPTER, metadata=metadata)
    finally:
        if plan.checkpointing:
            trainer.denoiser.disable_gradient_checkpointing()
        remove_lora(trainer)
    written = time.time() - t0  # with a loaded pipe: from model loaded to patch written
    summary = {"concepts": names, "method": cfg.method, "steps": steps, "seconds": round(seconds, 1),
               "prepare_seconds": round(prepare_seconds, 1), "step_seconds": round(step_seconds, 2),
               "peak_rss_gib": round(peak_rss() / 2**30, 2), "expected_peak_gib": round(plan.estimate.total / 2**30, 2),
               "seconds_to_written": round(written, 3), "rank": rank, "solve": solved or None,
               "bytes": path.stat().st_size, "path": str(path), "device": str(spec.device),
               "first_loss": losses[0] if losses else None,
               "last_loss": sum(losses[-5:]) / max(1, len(losses[-5:])) if losses else None, "losses": losses,
               "robust": getattr(trainer, "robust_stats", None)}  # the inner attack's cost, when --robust
    return path, summary


def patch_metadata(spec: RunSpec, hparams: dict, seconds: float) -> dict[str, str]:
    """The patchforge.* keys a trained patch records (the base's fingerprint is added when it is saved)."""
    metadata = {K_CONCEPT: "; ".join(s.key for s in spec.specs),
                K_CONCEPTS: json.dumps([s.to_json() for s in spec.specs]), K_METHOD: spec.cfg.method,
                K_HPARAMS: json.dumps(hparams), K_SECONDS: f"{seconds:.1f}", K_DEVICE: str(spec.device),
                K_SEED: str(spec.cfg.seed), K_BASE_ID: public_model_id(spec.source)}  # never a local path
    repo_id = hub_repo_id(spec.source)
    if repo_id:
        metadata[K_BASE_REPO_ID] = repo_id
    return metadata


def model_facts(model: str | None):
    """ModelFacts of a model not loaded yet (its folder, or a Hub id's cached snapshot); None if unknown."""
    folder = local_folder(model)
    return ModelFacts.from_folder(folder) if folder else None


def family_config(hp, cfg: TrainConfig, facts):
    """The method's Config for this run: its ROBUST defaults under --robust (FAST under --fast), then, on a
    joint-attention denoiser (SD3, FLUX), its JOINT_ATTENTION defaults (JOINT_FAST under --fast where the
    method has them), each for the fields the user did not set (--steps, --lr, --set)."""
    user = set(cfg.options) | {k for k in ("steps", "lr") if getattr(cfg, k) is not None}
    cls = type(hp)
    changes = dict(cls.ROBUST) if cfg.robust else dict(cls.FAST) if cfg.fast else {}
    if facts is not None and facts.joint_attention:
        changes.update(cls.JOINT_FAST if cfg.fast and cls.JOINT_FAST else cls.JOINT_ATTENTION)
    return replace(hp, **{k: v for k, v in changes.items() if k not in user}) if changes else hp


def default_name(specs: list[ConceptSpec], method: str) -> str:
    slug = "+".join(re.sub(r"[^a-z0-9]+", "-", f"{s.kind}-{s.name}".lower()).strip("-") for s in specs)[:80]
    return f"{slug}.{method}.safetensors"


# ---------------------------------------------------------------- CLI
LOOP_OPTIONS = {"ref_steps": 10, "ref_guidance": 5.0, "overfit_batch": False}  # --set keys the loop reads, defaults
# options whose values outside a range give a silently wrong run (no reference image, a black one)
OPTION_RANGES = {"n_refs": (1, 4096), "ref_steps": (1, 1000), "ref_guidance": (0.0, 100.0), "steps": (1, 10 ** 6)}


def method_config(method_cls, options: dict):
    """The method's Config from --set options. A key that neither the method, the loop nor --robust
    (robust_*) knows is a typo and fails with the method's options listed; a value of the wrong type
    (preserve_weight=abc) or a number that is not finite fails naming the expected type."""
    own = {f.name: f for f in fields(method_cls.Config)}
    robust = {f"robust_{f.name}": f.default for f in fields(RobustConfig)}
    defaults = {**{k: f.default for k, f in own.items()}, **LOOP_OPTIONS, **robust}
    for key, value in options.items():
        if key not in defaults:
            known = sorted(own) + list(LOOP_OPTIONS)
            close = difflib.get_close_matches(key, known + sorted(robust), n=1)
            raise PatchforgeError(f"--set {key}: not an option of {method_cls.name}"
                                  + (f" (did you mean {close[0]}?)" if close else "")
                                  + f"; options: {', '.join(known)}")
        _check_option_type(key, value, defaults[key])
        low, high = OPTION_RANGES.get(key, (None, None))
        if low is not None and not low <= value <= high:
            raise PatchforgeError(f"--set {key}={value}: must be from {low:g} to {high:g}")
    return method_cls.Config(**{k: v for k, v in options.items() if k in own})


def _check_option_type(key: str, value, default) -> None:
    """value has the type of the option's default (an int where a float is expected is fine)."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif default is None:  # optional numbers (robust_lr): None means the computed default
        ok, want = _is_number(value) and math.isfinite(value), "a finite number"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, want = _is_number(value) and math.isfinite(value), "a finite number"
    else:
        ok, want = isinstance(value, str), "a word"
    if not ok:
        shown = value if isinstance(value, str) else json.dumps(value)
        raise PatchforgeError(f"--set {key}={shown}: expected {want}")
