"""`patchforge toy train`: rebuild the embedded default model and its judges from a seed.

Stages (each with a progress bar):
  1. render a captioned dataset from the toy world,
  2. train the VAE (AutoencoderKL, 32x32x3 <-> 16x16x4),
  3. encode the dataset once, set the VAE scaling factor from the latents' std,
  4. train UNet2DConditionModel and CLIPTextModel together (caption dropout for CFG, EMA weights),
  5. train the judges (separate architecture and seed),
  6. save a diffusers StableDiffusionPipeline folder plus judges.safetensors and a build report.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.atomic import write_text
from ..errors import PatchforgeError
from . import checkpoint
from .judges import WORLDS, Judge, JudgeNet, identity_accuracy_by_art, judge_accuracy, save_judge, train_judge
from .tokenizer import build_tokenizer

# world -> (VAE block widths, tokenizer length). v2 is drawn at 32x32 like v1: at 64x64 a VAE that
# downsamples /4 to the same 16x16x4 latents lost colour (its reconstructions cut the colour judge from
# 97 % to 84 %), cost 1.7 s a step, and the UNet did not learn the world in the build budget
# (docs/toy-model.md, "World v2").
WORLD_BUILD = {"v1": ((32, 64), 32), "v2": ((32, 64), 48)}
# world -> build settings that differ from ToyBuildConfig's (v1's) defaults. v2's UNet steps fit its
# 100-minute budget on a 2-core CPU (0.89 s a step there, 2026-12-02; docs/toy-model.md).
WORLD_DEFAULTS = {"v1": {}, "v2": {"unet_steps": 5500}}


@dataclass
class BuildCommon:
    """What every toy build shares: the dataset, caption dropout (for guidance), the EMA that ships."""
    seed: int = 0
    dataset_size: int = 40_000
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 0  # 0: torch's default


@dataclass
class ToyBuildConfig(BuildCommon):
    vae_steps: int = 600
    unet_steps: int = 8500
    judge_steps: int = 1200
    batch_size: int = 64
    lr: float = 6e-4
    # Min-SNR-gamma loss weighting (Hang et al. 2023): stops the many easy low-noise timesteps from
    # dominating the gradient, so the coarse layout and colour, decided at high noise, learn faster.
    min_snr_gamma: float = 5.0
    world: str = "v1"  # v1: toyworld/world.py; v2: toyworld/world_v2.py (both 32x32)
    checkpoint_every: int = 500  # UNet steps between resumable checkpoints (0: none)


def make_vae(image_size: int = 32, vae_blocks: tuple = (32, 64)):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
                         down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
                         block_out_channels=vae_blocks, layers_per_block=1)


def text_encoder_config(tokenizer, **extra):
    """The toy's CLIP text encoder: 4 layers of width 128 (extra: e.g. a projection_dim for SD3's slots)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                          num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def make_components(tokenizer, image_size: int = 32, vae_blocks: tuple = (32, 64)):
    """The architecture of the toy model: a small but genuine Stable Diffusion."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = make_vae(image_size, vae_blocks)
    latent = image_size // 2 ** (len(vae_blocks) - 1)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                layers_per_block=1, cross_attention_dim=128, attention_head_dim=8)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    # SD's noise schedule and DDIM settings; steps_offset=1 as diffusers expects for SD
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return vae, unet, text_encoder, scheduler


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """The toy's parts as a Stable Diffusion pipeline (no safety checker): what a build saves."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def random_scenes(wm, rng: random.Random, n: int) -> list:
    return [wm.random_scene(rng) for _ in tqdm(range(n), desc="render scenes", leave=False, disable=None)]


def render_images(scenes, rng: random.Random, render) -> torch.Tensor:
    """uint8 NCHW: a quarter of float32's memory (40 000 32x32 images: 123 MB), rendered 1 000 at a time."""
    def chunk(part):
        arr = np.stack([render(s, rng.randrange(1 << 30)) for s in part])
        # kept in the permuted (channels-last) layout v1 always had: convolutions sum in layout order,
        # so a contiguous copy would change the build's bits
        return torch.from_numpy(arr).permute(0, 3, 1, 2)
    starts = tqdm(range(0, len(scenes), 1000), desc="render images", disable=None)
    return torch.cat([chunk(scenes[i:i + 1000]) for i in starts])


def encode_posteriors(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every uint8 image, 500 at a time."""
    with torch.no_grad():
        dists = [vae.encode(to_pixels(images[i:i + 500])).latent_dist
                 for i in tqdm(range(0, len(images), 500), desc="encode images", disable=None)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def ema_step(loss, opt, sched, params, ema_params, ema_decay: float, step: int) -> None:
    """One optimiser step of a denoiser (gradient clipped to 1) and its EMA update, warmed up early."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():  # one fused call: a Python loop over ~300 tensors costs ~5 % of a step
        torch._foreach_lerp_(ema_params, params, 1 - decay)


@dataclass
class LatentDataset:
    """The encoded dataset: each scene's VAE posterior (mean, std) and how latents are normalised,
    (z - shift) * scaling (SD's VAEs have no shift; SD3's do)."""
    scenes: list
    means: torch.Tensor
    stds: torch.Tensor
    scaling: float
    shift: float = 0.0


def sample_batch(data: LatentDataset, rng: random.Random, wm, batch_size: int, caption_dropout: float):
    """A training batch: scaled latents sampled from their posteriors, and a fresh caption for each scene
    ("" with probability caption_dropout, for classifier-free guidance)."""
    idx = torch.randint(0, len(data.means), (batch_size,))
    latents = ((data.means[idx] + data.stds[idx] * torch.randn_like(data.means[idx])) - data.shift) * data.scaling
    texts = ["" if rng.random() < caption_dropout else wm.caption(data.scenes[i], rng, "any")
             for i in idx.tolist()]
    return latents, texts


def min_snr_weights(noise_schedule, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights min(SNR, gamma) / SNR (all ones for gamma 0)."""
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / snr if gamma else torch.ones_like(snr)


def denoiser_loss(unet, text_encoder, tokenizer, noise_schedule, latents, texts, snr_weight) -> torch.Tensor:
    """The UNet's epsilon-prediction loss at random timesteps, weighted per timestep (Min-SNR)."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    cond = text_encoder(ids)[0]
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(latents),))
    pred = unet(noise_schedule.add_noise(latents, noise, t), t, cond).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * snr_weight[t]).mean()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def train_vae(vae, images: torch.Tensor, steps: int, batch: int) -> float | None:
    """Train the VAE on uint8 images (reconstruction + a little KL); returns the last loss (None: no steps)."""
    if not steps:  # e.g. a resumed build, whose VAE comes from its checkpoint
        return None
    opt = torch.optim.AdamW(vae.parameters(), 2e-3)
    sched = cosine_lr(opt, steps, warmup=100)
    loss = None
    bar = tqdm(range(steps), desc="train VAE", disable=None)
    for step in bar:
        x = to_pixels(images[torch.randint(0, len(images), (batch,))])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return None if loss is None else round(loss.item(), 5)


def cosine_lr(opt, steps, warmup=200):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))


def build_toy_model(out_dir: Path, cfg: ToyBuildConfig, log=print, resume: bool = False, on_checkpoint=None) -> dict:
    """resume: continue from out_dir's last checkpoint (bit-exactly; a fresh build if there is none).
    on_checkpoint(step): called after each checkpoint is written."""
    if cfg.world not in WORLD_BUILD:
        raise PatchforgeError(f"unknown toy world {cfg.world!r}; choose one of {', '.join(WORLD_BUILD)}")
    wm, (vae_blocks, max_tokens) = WORLDS[cfg.world], WORLD_BUILD[cfg.world]
    ckpt = Path(out_dir) / "checkpoints" / checkpoint.FILE
    resumed = resume and ckpt.exists()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer(wm.vocabulary(), max_tokens)
    vae, unet, text_encoder, scheduler = make_components(tokenizer, wm.IMAGE_SIZE, vae_blocks)
    report = {"config": asdict(cfg), "device": "cpu", "torch_threads": torch.get_num_threads(), "stages": {}}

    # 1. dataset ---------------------------------------------------------------------------
    t0 = time.time()
    scenes = random_scenes(wm, rng, cfg.dataset_size)
    images = render_images(scenes, rng, wm.render)
    report["stages"]["dataset_s"] = round(time.time() - t0, 1)

    # 2. VAE ---------------------------------------------------------------------------------
    t0 = time.time()
    # resumed: the checkpoint's VAE
    vae_loss = train_vae(vae, images, 0 if resumed else cfg.vae_steps, cfg.batch_size // 2)
    # what a checkpoint must have been built with to be resumed (threads and checkpointing may change)
    same = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "checkpoint_every")}
    if resumed:
        extra = checkpoint.read_extra(ckpt)
        if extra.get("config") != same:
            raise PatchforgeError(f"{ckpt} was written by a build with other settings ({extra.get('config')}); "
                                  "resume with those, or delete it to start again")
        checkpoint.load(ckpt, {"vae": vae}, {}, random.Random())
    else:
        extra = {"vae_final_loss": vae_loss, "config": same}
    vae.eval().requires_grad_(False)
    report["stages"]["vae_s"] = round(time.time() - t0, 1)
    report["vae_final_loss"] = extra["vae_final_loss"]

    # 3. latents -----------------------------------------------------------------------------
    means, stds = encode_posteriors(vae, images)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    report["vae_scaling_factor"] = round(scaling, 5)

    # 4. UNet + text encoder ----------------------------------------------------------------------
    t0 = time.time()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=1e-2)
    sched = cosine_lr(opt, cfg.unet_steps)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())  # same order as params
    train_sched = scheduler  # same betas; add_noise only needs alphas_cumprod
    snr_weight = min_snr_weights(train_sched, cfg.min_snr_gamma)
    data = LatentDataset(scenes, means, stds, scaling)
    state = ({"vae": vae, "unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text},
             {"optimizer": opt, "lr_schedule": sched})
    start = checkpoint.load(ckpt, *state, rng)["step"] if resumed else 0
    last_loss = extra.get("unet_loss")
    if cfg.checkpoint_every and not resumed:  # the VAE stage's result: a resume never redoes it
        checkpoint.save(ckpt, 0, *state, rng, extra)
    bar = tqdm(range(start, cfg.unet_steps), desc="train UNet + text encoder", initial=start, total=cfg.unet_steps,
               disable=None)
    for step in bar:
        latents, texts = sample_batch(data, rng, wm, cfg.batch_size, cfg.caption_dropout)
        loss = denoiser_loss(unet, text_encoder, tokenizer, train_sched, latents, texts, snr_weight)
        ema_step(loss, opt, sched, params, ema_params, cfg.ema_decay, step)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last_loss = round(loss.item(), 5)
        # the last step too: a build interrupted in the judge stage resumes straight to it
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps):
            checkpoint.save(ckpt, step + 1, *state, rng, {**extra, "unet_loss": last_loss})
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    report["stages"]["unet_s"] = round(time.time() - t0, 1)
    report["unet_final_loss"] = last_loss

    pipe = sd_pipeline(vae, ema_text.eval(), tokenizer, ema_unet.eval(), scheduler)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)

    # 5. judges -------------------------------------------------------------------------------
    report["stages"]["judges_s"], report["judge_accuracy_real"], by_art = build_judges(out_dir, vae, cfg)
    if by_art:
        report["identity_accuracy_by_art"] = by_art
    report["total_s"] = round(time.time() - t_start, 1)
    report["parameters"] = {name: sum(p.numel() for p in m.parameters())
                            for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                                            ("judge", JudgeNet(world_name=cfg.world)))}
    write_text(out_dir / "build_report.json", json.dumps(report, indent=2))
    ckpt.unlink(missing_ok=True)  # built: nothing left to resume
    if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
        ckpt.parent.rmdir()
    return report


def build_judges(out_dir: Path, vae, cfg: ToyBuildConfig) -> tuple[float, dict, dict]:
    """Train the judges with the model's own VAE (they must read decoded images) and save them.
    Also `patchforge toy judges`, which reloads the VAE: the result is the same either way.
    Returns (seconds, accuracy per kind, identity accuracy per art style: {} for v1)."""
    t0 = time.time()
    bar = tqdm(total=cfg.judge_steps, desc="train judges", disable=None)
    net = train_judge(cfg.judge_steps, seed=cfg.seed + 1000, vae=vae, batch=cfg.batch_size,
                      progress=lambda loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")), world_name=cfg.world)
    bar.close()
    save_judge(net, Path(out_dir) / "judges.safetensors")
    judge = Judge(net)
    return round(time.time() - t0, 1), judge_accuracy(judge), identity_accuracy_by_art(judge)

