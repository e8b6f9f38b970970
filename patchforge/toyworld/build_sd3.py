"""`patchforge toy train --family sd3`: the toy world's diffusion transformer, a tiny SD3.

Only the transformer is trained. Everything else is the UNet toy's, frozen: its VAE (so its judges,
trained on that VAE's decodings, judge this model too), its tokenizer, and its CLIP text encoder, used
as both of SD3's CLIP encoders (`CLIPTextModelWithProjection` with an identity projection). There is
no real T5: its slot holds an encoder that outputs zeros, exactly what `StableDiffusion3Pipeline`
appends for a checkpoint without T5 (256 zero vectors after the prompt's CLIP tokens).

Stages (each with a progress bar):
  1. render the captioned dataset from the toy world (same generator and captions as the UNet toy),
  2. encode it with the UNet toy's VAE; set the VAE's shift and scaling factors from the latents,
  3. train the SD3Transformer2DModel on rectified flow (velocity target, logit-normal times, caption
     dropout for guidance, EMA weights), checkpointing so an interrupted build resumes where it stopped,
  4. save a diffusers StableDiffusion3Pipeline folder and a build report.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text
from ..errors import PatchforgeError
from ..core.pipeline_loading import TOY_MODEL_DIR
from . import checkpoint
from .build import (WORLD_BUILD, BuildCommon, LatentDataset, ToyBuildConfig, build_judges, ema_step,
                    encode_posteriors, make_vae, random_scenes, render_images, sample_batch, text_encoder_config,
                    train_vae)
from .judges import WORLDS

T5_PADDING = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero "T5" tokens it appends
FOLDED = 2  # training computes the padding as this many tokens (a CLIP tokenizer needs 2 for BOS and EOS)
CHECKPOINT = checkpoint.FILE
LATENTS = "latents.pt"  # the encoded dataset, kept while a build runs, so a resumed build skips encoding


@dataclass
class ToyDiTBuildConfig(BuildCommon):
    steps: int = 4000  # what the shipped build ran (docs/toy-model.md: with 4 layers 4 000 steps missed the style bar)
    batch_size: int = 32
    lr: float = 1e-3
    layers: int = 6  # 4 layers drew textures (style) at 72 % after 4 000 steps; 6 at 100 %
    heads: int = 3
    head_dim: int = 32
    checkpoint_every: int = 250
    # the UNet toy folder whose VAE, tokenizer, text encoder and judges are reused. Default: the shipped
    # UNet toy for world v1; none for world v2, whose build trains its own (OWN_PARTS)
    base: str = ""
    world: str = "v1"  # the world of the captions and images; a base must have been built from the same one
    vae_steps: int = 600  # a build without a base only: its VAE, as the UNet toy's build trains it
    judge_steps: int = 1200  # a build without a base only: its judges, as the UNet toy's build trains them


# world -> settings that differ from ToyDiTBuildConfig's (v1's) defaults. v2 trains its own VAE, text
# encoder and judges, and a wider transformer (4 heads: 3.5 M parameters); 6 500 steps is the build
# measured in docs/toy-model.md (0.53 s a step on 2 cores, text encoder included)
WORLD_DEFAULTS = {"v1": {}, "v2": {"heads": 4, "steps": 6500}}
OWN_PARTS = {"v2"}  # worlds whose DiT build needs no UNet toy


def make_transformer(cfg: ToyDiTBuildConfig, joint_attention_dim: int):
    from diffusers import SD3Transformer2DModel

    inner = cfg.heads * cfg.head_dim
    # 16x16x4 latents in 2x2 patches: 64 image tokens. SD3-medium's layout (no qk-norm, no dual attention).
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=cfg.layers,
                                 attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                                 joint_attention_dim=joint_attention_dim, caption_projection_dim=inner,
                                 pooled_projection_dim=joint_attention_dim, pos_embed_max_size=16)


def make_pipeline(base: Path, cfg: ToyDiTBuildConfig):
    """The pipeline before training: the UNet toy's frozen parts, a zero T5 and a fresh transformer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer, CLIPTextModelWithProjection

    src = base / "pipeline"
    tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer")
    # the UNet toy's CLIPTextModel, with a projection head (set by _assemble)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        src / "text_encoder", projection_dim=_hidden(src)).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(src / "vae").eval().requires_grad_(False)
    return _assemble(cfg, vae, text_encoder, tokenizer)


def make_own_pipeline(cfg: ToyDiTBuildConfig):
    """The pipeline before training, all of it fresh: the UNet toy's VAE and CLIP architectures (trained
    here), the world's tokenizer, a zero T5 and the transformer."""
    from transformers import CLIPTextModelWithProjection

    from .tokenizer import build_tokenizer

    vae_blocks, max_tokens = WORLD_BUILD[cfg.world]
    tokenizer = build_tokenizer(WORLDS[cfg.world].vocabulary(), max_tokens)
    vae = make_vae(WORLDS[cfg.world].IMAGE_SIZE, vae_blocks)
    text_encoder = CLIPTextModelWithProjection(text_encoder_config(tokenizer, projection_dim=128))
    return _assemble(cfg, vae, text_encoder, tokenizer)


def _assemble(cfg: ToyDiTBuildConfig, vae, text_encoder, tokenizer):
    """SD3's layout around the toy's CLIP: the same encoder in both CLIP slots, a zero T5 and a fresh
    transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # the projection head is the identity, so the pooled embedding is the final EOS state; set explicitly
    # (from_pretrained leaves a missing head randomly initialised) and never trained
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(text_encoder.config.projection_dim))
    text_encoder.text_projection.requires_grad_(False)
    # two CLIPs side by side: the joint text width is twice the encoder's
    width = 2 * text_encoder.config.hidden_size
    transformer = make_transformer(cfg, width)
    # shift 1: SD3's 3.0 compensates for 128x128 latents; 16x16 ones are noisy enough at shift 1
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=copy.deepcopy(text_encoder), tokenizer_2=copy.deepcopy(tokenizer),
                                    text_encoder_3=zero_t5(tokenizer, width), tokenizer_3=copy.deepcopy(tokenizer))


def zero_t5(tokenizer, width: int):
    """The T5 slot, holding a T5 encoder with no layers and a zero final norm: it outputs exactly the
    zeros StableDiffusion3Pipeline uses when there is no T5. A null slot would do the same, but plain
    `StableDiffusion3Pipeline.from_pretrained` refuses a folder whose text_encoder_3 is null."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=8, num_layers=0, num_heads=1,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    model = T5EncoderModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _base_world(base: Path) -> str:
    """The world a UNet toy was built from (its build report; the shipped v1 toy's predates the field)."""
    report = base / "build_report.json"
    config = json.loads(report.read_text()).get("config", {}) if report.exists() else {}
    return config.get("world", "v1")


def _hidden(src: Path) -> int:
    return json.loads((src / "text_encoder" / "config.json").read_text())["hidden_size"]


class PaddedJointAttnProcessor:
    """SD3 joint attention with the 256 identical zero "T5" tokens folded into two (training only).

    Without T5 the pipeline appends 256 zero vectors to the prompt; every block maps them to 256
    identical tokens, so any query's attention gives them 256 equal shares. Two such tokens whose
    attention logits are raised by log(256 / 2) get exactly their total share and give the same output:
    the same model, computed on 64 + 34 tokens instead of 64 + 288.
    Generation uses diffusers' own processor on the full padding."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = torch.cat([split(attn.to_q(hidden_states)), split(attn.add_q_proj(encoder_hidden_states))], dim=2)
        k = torch.cat([split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))], dim=2)
        v = torch.cat([split(attn.to_v(hidden_states)), split(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-FOLDED:] = math.log(T5_PADDING / FOLDED)  # the last text tokens stand for all the padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


def encode(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What `pipe.encode_prompt` gives, with the zero padding folded to FOLDED tokens (see above).

    Computed here, not by encode_prompt: both CLIP slots hold the same encoder, so one pass serves both
    (the text encoding was half of a training step). tests/test_toy_sd3.py checks it against the pipeline."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                         return_tensors="pt").input_ids
    out = pipe.text_encoder(ids, output_hidden_states=True)
    pooled, hidden = out[0], out.hidden_states[-2]  # SD3's choice: the penultimate layer, no clip skip
    width = pipe.transformer.config.joint_attention_dim
    clip = F.pad(torch.cat([hidden, hidden], dim=-1), (0, width - 2 * hidden.shape[-1]))
    padding = torch.zeros(len(texts), FOLDED, width)
    return torch.cat([clip, padding], dim=1), torch.cat([pooled, pooled], dim=-1)


def _model_key(cfg: ToyDiTBuildConfig) -> str:
    """What a checkpoint must share with the build resuming it (not: steps, threads, checkpointing)."""
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("steps", "threads", "checkpoint_every")})


def _save_checkpoint(path: Path, step: int, cfg, modules: dict, opt, sched, rng: random.Random, spent: dict) -> None:
    checkpoint.save(path, step, modules, {"opt": opt, "sched": sched}, rng, {"key": _model_key(cfg), "spent": spent})


def _load_checkpoint(path: Path, cfg, modules: dict, opt, sched, rng: random.Random) -> tuple[int, dict]:
    extra = checkpoint.read_extra(path)
    if json.loads(extra["key"]) != json.loads(_model_key(cfg)):  # as dicts: field order does not matter
        raise PatchforgeError(f"{path} is from a build with other settings ({extra['key']}); "
                              "delete it or build into another --out")
    state = checkpoint.load(path, modules, {"opt": opt, "sched": sched}, rng)
    # training time spent before the checkpoint, so a resumed build reports its whole cost
    return state["step"], extra.get("spent", {"train_s": None, "train_cpu_s": None, "losses": []})


def build_toy_dit(out_dir: Path, cfg: ToyDiTBuildConfig, log=print) -> dict:
    """Build (or resume building) the DiT toy into out_dir/pipeline; returns the build report."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.world not in WORLDS:
        raise PatchforgeError(f"unknown toy world {cfg.world!r}; choose one of {', '.join(WORLDS)}")
    # own: VAE, text encoder and judges are trained here, with the transformer (no base to borrow them from)
    own = not cfg.base and cfg.world in OWN_PARTS
    base = None if own else Path(cfg.base) if cfg.base else TOY_MODEL_DIR
    base_world = cfg.world if base is None else _base_world(base)
    if base_world != cfg.world:  # its VAE, tokenizer and judges know one world
        raise PatchforgeError(f"the base {base} was built from world {base_world}, not {cfg.world}: "
                              f"give --base a world {cfg.world} UNet toy, or none")
    wm = WORLDS[cfg.world]
    t_start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pipe = make_own_pipeline(cfg) if own else make_pipeline(base, cfg)
    transformer, vae, text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
    report = {"config": asdict(cfg), "family": "sd3",
              "base": "none (own VAE, text encoder and judges)" if own else cfg.base or "patchforge/toy-sd (shipped)",
              "device": "cpu", "torch_threads": torch.get_num_threads(), "stages": {}, "cpu_s": {}}

    # 1. dataset: the same generator, rendered in the same order as the UNet toy's build --------------
    t0, c0 = time.time(), time.process_time()
    scenes = random_scenes(wm, rng, cfg.dataset_size)
    key = {"seed": cfg.seed, "dataset_size": cfg.dataset_size, "world": cfg.world,
           "base": str(base.resolve()) if base else {"vae_steps": cfg.vae_steps}}
    cache = out_dir / LATENTS
    saved = torch.load(cache, weights_only=True) if cache.exists() else None
    if saved is not None and saved["key"] == json.dumps(key):
        means, stds = saved["means"], saved["stds"]
        rng.setstate((3, tuple(saved["py_rng"]), None))  # where rendering the images left it
        if own:
            vae.load_state_dict(saved["vae"])
        report["vae_final_loss"] = saved.get("vae_final_loss")
    else:
        images = render_images(scenes, rng, wm.render)
        # 2. the VAE, when the build trains its own (at the UNet toy build's VAE batch, 32)
        if own:
            report["vae_final_loss"] = train_vae(vae, images, cfg.vae_steps, 32)
            vae.eval().requires_grad_(False)
        # latents, with SD3's shift and scale: (z - shift) * scale has mean 0 and std 1
        means, stds = encode_posteriors(vae, images)
        del images
        with atomic_path(cache) as tmp:
            torch.save({"key": json.dumps(key), "means": means, "stds": stds, "py_rng": list(rng.getstate()[1]),
                        "vae": vae.state_dict(), "vae_final_loss": report.get("vae_final_loss")}, tmp)
    shift = float(means.mean())
    scale = float(1.0 / (means - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    report["vae_shift_factor"], report["vae_scaling_factor"] = round(shift, 5), round(scale, 5)
    data = LatentDataset(scenes, means, stds, scale, shift)
    report["stages"]["dataset_s"] = round(time.time() - t0, 1)
    report["cpu_s"]["dataset"] = round(time.process_time() - c0, 1)

    # 3. transformer (and, in a build of its own, the text encoder with it, as the UNet toy's build does) ----
    t0, c0 = time.time(), time.process_time()
    transformer.train()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False) if own else None
    # (trained module, its EMA); the text projection is a fixed identity, in neither list
    pairs = [(transformer, ema)] + ([(text_encoder, ema_text)] if own else [])
    params = [p for m, _ in pairs for p in m.parameters() if p.requires_grad]
    ema_params = [e for m, m_ema in pairs for p, e in zip(m.parameters(), m_ema.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=1e-2)
    # warm-up, then constant (the EMA does the averaging): no schedule depends on cfg.steps, so the
    # first N steps of any build are exactly the build with --steps N (an interrupted build can ship)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    modules = {"transformer": transformer, "ema": ema}
    if own:
        modules.update(text_encoder=text_encoder, ema_text=ema_text)
    ckpt, start, before = out_dir / CHECKPOINT, 0, {"train_s": 0.0, "train_cpu_s": 0.0, "losses": []}
    if ckpt.exists():
        start, before = _load_checkpoint(ckpt, cfg, modules, opt, sched, rng)
        log(f"resuming from {ckpt} at step {start}")
    transformer.set_attn_processor(PaddedJointAttnProcessor())
    bar = tqdm(range(start, cfg.steps), desc="train SD3 transformer", initial=start, total=cfg.steps, disable=None)
    losses = list(before["losses"])

    def spent() -> dict:
        add = lambda a, b: None if a is None else round(a + b, 1)  # noqa: E731 (None: not recorded)
        return {"train_s": add(before["train_s"], time.time() - t0),
                "train_cpu_s": add(before["train_cpu_s"], time.process_time() - c0), "losses": losses[-100:]}

    for step in bar:
        latents, texts = sample_batch(data, rng, wm, cfg.batch_size, cfg.caption_dropout)
        with torch.set_grad_enabled(own):
            embeds, pooled = encode(pipe, texts)
        noise = torch.randn_like(latents)
        # rectified flow: x_t = (1 - s) x0 + s noise, velocity noise - x0; logit-normal s (SD3's sampling)
        s = torch.sigmoid(torch.randn(len(latents)))
        noisy = (1 - s)[:, None, None, None] * latents + s[:, None, None, None] * noise
        pred = transformer(noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=s * 1000, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - latents)
        ema_step(loss, opt, sched, params, ema_params, cfg.ema_decay, step)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, step + 1, cfg, modules, opt, sched, rng, spent())
    bar.close()
    total = spent()  # all segments of the build, if it was resumed
    report["stages"]["transformer_s"], report["cpu_s"]["transformer"] = total["train_s"], total["train_cpu_s"]
    report["resumed_at_step"] = start
    if total["train_s"] is not None and cfg.steps:
        report["s_per_step"] = round(total["train_s"] / cfg.steps, 3)
        report["cpu_s_per_step"] = round(total["train_cpu_s"] / cfg.steps, 3)
    if losses:
        report["final_loss_last100"] = round(sum(losses[-100:]) / len(losses[-100:]), 5)

    # 4. save: diffusers' own attention processor, the EMA weights --------------------------------
    ema.set_attn_processor(JointAttnProcessor2_0())
    pipe.register_modules(transformer=ema.eval())
    if own:  # the EMA text encoder in both CLIP slots
        pipe.register_modules(text_encoder=ema_text.eval(), text_encoder_2=copy.deepcopy(ema_text).eval())
    pipeline_dir = out_dir / "pipeline"
    tmp_dir = out_dir / "pipeline.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.save_pretrained(tmp_dir, safe_serialization=True)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    tmp_dir.rename(pipeline_dir)
    # files of the base are shared only when the build lands inside it (the shipped DiT toy): a build
    # elsewhere must not point into another folder
    inside = base is not None and out_dir.resolve().is_relative_to(base.resolve())
    report["shared_bytes"] = share_identical_files(pipeline_dir, base / "pipeline" if inside else None)
    if own:  # 5. judges, trained on this VAE's decodings, with the UNet toy build's judge recipe and batch
        judge_cfg = ToyBuildConfig(seed=cfg.seed, judge_steps=cfg.judge_steps, batch_size=64, world=cfg.world)
        report["stages"]["judges_s"], report["judge_accuracy_real"], by_art = build_judges(out_dir, vae, judge_cfg)
        report["identity_accuracy_by_art"] = by_art
    elif not inside and not (out_dir / "judges.safetensors").exists():
        # the base's judges read this VAE's images: a rebuild elsewhere carries them (`toy report --model`)
        shutil.copyfile(base / "judges.safetensors", out_dir / "judges.safetensors")
    ckpt.unlink(missing_ok=True)
    cache.unlink(missing_ok=True)
    # this process, plus the training of earlier segments when resumed (None: they did not record it)
    report["total_s"] = None if before["train_s"] is None else round(time.time() - t_start + before["train_s"], 1)
    report["total_cpu_s"] = (None if before["train_cpu_s"] is None
                             else round(time.process_time() - cpu_start + before["train_cpu_s"], 1))
    shared = "" if own else " (shared)"
    report["parameters"] = {"transformer": sum(p.numel() for p in ema.parameters()),
                            f"vae{shared}": sum(p.numel() for p in vae.parameters()),
                            f"text_encoder{shared}": sum(p.numel() for p in pipe.text_encoder.parameters())}
    write_text(out_dir / "build_report.json", json.dumps(report, indent=2))
    return report


def share_identical_files(folder: Path, base: Path | None) -> int:
    """Replace files that are byte-identical to one in `base` (same relative path; None: no base) or, across
    the text slots, to text_encoder's / tokenizer's, by relative symlinks: the frozen parts are stored once.
    Plain diffusers loads the folder as before. Returns the bytes saved."""
    import filecmp
    import os

    saved = 0
    pairs = [(f, base / f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()] if base else []
    for slot in ("text_encoder", "tokenizer"):
        for other in (folder / f"{slot}_2", folder / f"{slot}_3"):
            pairs += [(f, folder / slot / f.name) for f in other.glob("*")]
    for f, original in pairs:
        if f.is_symlink() or not original.is_file() or not filecmp.cmp(f, original, shallow=False):
            continue
        target = os.path.relpath(original.resolve() if original.is_symlink() else original, f.parent)
        size = f.stat().st_size
        f.unlink()
        f.symlink_to(target)
        saved += size
    return saved
