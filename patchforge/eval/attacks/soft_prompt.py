"""soft_prompt: optimise K continuous token embeddings appended to the target prompts so that the patched
model's guided noise prediction matches the frozen base model's for the plain prompt (the models' own
denoising, no judge in the loop; UnlearnDiffAtk-style, one suffix shared by the prompts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...pipeline.sampling import GUIDANCE, encode_prompts, generate, generate_latents
from ...pipeline.soft_tokens import SoftPrompt
from ...io.loading import patches_suspended
from . import Attack, Outcome, Target, for_pipe, guided, knob, register


def concept_latents(pipe, prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Base-model generations of the plain target prompts, as clean latents (what the concept looks like)."""
    with patches_suspended(pipe):
        latents = generate_latents(pipe, prompts, [seed * 7919 + i for i in range(len(prompts))], batch=len(prompts))
    return latents.to(pipe.device)


def soft_prompt_attack(pipe, prompts: list[str], steps: int = 30, n_tokens: int = 4, lr: float | None = None,
                       negative: str | None = None, seed: int = 0, latents: torch.Tensor | None = None) -> SoftPrompt:
    """Optimise a soft suffix shared by `prompts` so that the attacked model's guided prediction
    (its own unconditional branch, or `negative`) matches the base model's for the plain prompts."""
    backbone = for_pipe(pipe)
    latents = concept_latents(pipe, prompts, seed) if latents is None else latents
    soft = SoftPrompt(pipe, n_tokens, seed=seed)
    lr = lr or 0.5 * soft.scale
    opt = torch.optim.Adam([soft.vectors], lr=lr)
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        plain = encode_prompts(pipe, len(prompts), list(prompts))
        empty = encode_prompts(pipe, len(prompts))
        neg = encode_prompts(pipe, len(prompts), [negative] * len(prompts)) if negative else empty
    for _ in range(steps):
        x_t, t, _ = backbone.noised(latents, g)
        with patches_suspended(pipe), torch.no_grad():
            target = guided(backbone, x_t, t, plain, empty, GUIDANCE)
        pred = guided(backbone, x_t, t, soft.encode(pipe, prompts), neg, GUIDANCE)
        loss = F.mse_loss(pred.float(), target.float())
        (grad,) = torch.autograd.grad(loss, [soft.vectors])
        soft.vectors.grad = grad
        opt.step()
        soft.vectors.grad = None
    return soft


@register("soft_prompt")
class SoftPromptAttack(Attack):
    order = 10
    soft_suffix = True

    @dataclass(frozen=True)
    class Budget:
        tokens: int = knob(4, "soft_tokens")
        steps: int = knob(30, "soft_steps")
        lr: float | None = knob(None, "soft_lr")  # None: half the token embeddings' scale
        seed: int = knob(0, "seed", any_int=True)

    def run(self, t: Target) -> Outcome:
        b = self.b
        soft = soft_prompt_attack(t.pipe, t.prompts, steps=b.steps, n_tokens=b.tokens, lr=b.lr, negative=t.negative,
                                  seed=b.seed)
        with torch.no_grad():
            emb = soft.encode(t.pipe, t.rep)
        negative = [t.negative] * len(t.rep) if t.negative else None
        return Outcome(generate(t.pipe, t.rep, t.rep_seeds, prompt_embeds=emb, negative=negative), t.base_hits)

    def describe(self, extra: dict) -> str:
        return (f"ASR, soft-prompt attack ({self.b.tokens} tokens, {self.b.steps} steps); "
                "base = unattacked base model")
