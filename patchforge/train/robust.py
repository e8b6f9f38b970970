"""`patchforge train --robust`: adversarial training against soft-prompt attacks (AdvUnlearn-style).

The shared loop (train/loop.py) builds every target-prompt embedding through
`trainer.prompt_embeddings(prompts, role)`. `wrap_trainer` replaces that hook: for role == "target" it
first runs a few *inner* attack steps on soft tokens (patchforge.pipeline.soft_tokens: a SoftPrompt suffix
on SD 1.x / 2.x, a SoftPrefix in each text encoder where there are several: SDXL, SD3, FLUX) that
pull the current patched model's noise prediction back to the frozen base model's for the concept,
then hands the method the *attacked* embeddings, so the outer patch update erases the concept on the
attacked prompt too. The soft tokens persist
across outer steps (warm start: the attack keeps up with the patch). Retain: the method's own
preservation term on its preserve prompts (neighbours and other kinds) keeps the rest.

    inner:  min_v || eps_theta(x_t, c_target + v) - eps*(x_t, c_target) ||^2      (v: soft tokens)
    outer:  the method's loss with c_target + v in place of c_target (+ its preservation term)

Costs are recorded in trainer.robust_stats (inner steps and seconds) for the training summary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..pipeline.soft_tokens import learnable_tokens, soft_cond, suffix_unsupported


@dataclass
class RobustConfig:
    inner_steps: int = 3  # AdvUnlearn uses 30 on GPU; CPU budgets call for a few, warm-started
    tokens: int = 1  # AdvUnlearn attacks with one soft token
    lr: float | None = None  # default: half the token-embedding table's std per Adam step
    every: int = 1  # run the inner attack every `every` target encodings (reuse the suffix between)
    seed: int = 0


def wrap_trainer(trainer, config: RobustConfig | None = None) -> None:
    """Install the adversarial hook on a patchforge.train.loop.Trainer (called before LoRA injection)."""
    own = {f"robust_{k}": k for k in RobustConfig.__dataclass_fields__}  # --set robust_KEY=VALUE -> KEY
    cfg = config or RobustConfig(**{own[k]: v for k, v in trainer.cfg.options.items() if k in own})
    pipe, plain_encode = trainer.pipe, trainer.encode
    state = {"soft": None, "vectors": None, "opt": None, "latents": {}, "calls": 0}
    stats = trainer.robust_stats = {"inner_steps": 0, "inner_seconds": 0.0, "config": vars(cfg).copy()}
    g = torch.Generator("cpu").manual_seed(cfg.seed)

    def latents_for(prompts):
        """Base-model images of the target prompts (cached per prompt; disk cache in reference_latents)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in state["latents"]]
        if missing:
            lat = trainer.reference_latents(missing, "robust")
            state["latents"].update(zip(missing, lat))
        return torch.stack([state["latents"][p] for p in prompts]).float()

    def attack(prompts):
        if state["soft"] is None:  # several text encoders: a prefix in each, where a suffix cannot go
            state["soft"], state["vectors"], state["opt"] = learnable_tokens(
                pipe, cfg.tokens, cfg.seed, prefix=suffix_unsupported(pipe) is not None, lr=cfg.lr)
        soft, opt, vectors = state["soft"], state["opt"], state["vectors"]
        x0 = latents_for(prompts)
        with torch.no_grad():
            plain = trainer.embed(prompts, role="anchor", base=True)
        for _ in range(cfg.inner_steps):
            x_t, t, _ = trainer.backbone.noised(x0, g)
            x_t, t = x_t.to(trainer.device, trainer.backbone.dtype), t.to(trainer.device)
            target = trainer.predict(x_t, t, plain, base=True)
            pred = trainer.predict(x_t, t, soft_cond(pipe, soft, prompts))
            for v, grad in zip(vectors, torch.autograd.grad(F.mse_loss(pred, target), vectors)):
                v.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["inner_steps"] += 1

    def prompt_embeddings(prompts, role="other"):
        if role != "target":
            return plain_encode(prompts, role)
        t0 = time.perf_counter()
        if state["calls"] % cfg.every == 0:
            attack(list(prompts))
        state["calls"] += 1
        stats["inner_seconds"] += time.perf_counter() - t0
        if trainer.train_text:  # the text-encoder LoRA trains through the attacked encoding
            return soft_cond(pipe, state["soft"], list(prompts))
        with torch.no_grad():
            return soft_cond(pipe, state["soft"], list(prompts))

    trainer.prompt_embeddings = prompt_embeddings
