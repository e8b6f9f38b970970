"""inversion: textual inversion -- K new token embeddings learnt on images of the concept with the patched
model's denoising loss, then "a photo of <tokens>". inversion_converged: the same, run until its loss
plateaus (a step cap), reporting the steps it took. On pipelines with several text encoders (SDXL, SD3,
FLUX) the tokens are a prefix in each of them ("<tokens> a photo of"): a suffix needs one CLIP."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...pipeline.sampling import generate
from ...pipeline.soft_tokens import SoftPrefix, SoftPrompt, invert_latents, soft_cond, suffix_unsupported
from . import Attack, Outcome, Target, for_pipe, knob, register

TEMPLATE = "a photo of"  # textual inversion's prompt around the learnt tokens


def textual_inversion(pipe, images: np.ndarray, steps: int = 40, n_tokens: int = 2, lr: float | None = None,
                      seed: int = 0, template: str = TEMPLATE, patience: int = 0,
                      tol: float = 0.01) -> SoftPrompt | SoftPrefix:
    """Learn K token embeddings that make the (patched) model denoise images of the concept:
    the plain diffusion loss ||eps_theta(x_t, "a photo of <v>") - eps||^2, as in textual inversion.
    patience > 0: until the loss plateaus, `steps` at most (core/soft_tokens.py's Plateau)."""
    latents = for_pipe(pipe).encode_images(np.asarray(images))
    return invert_latents(pipe, latents, steps=steps, n_tokens=n_tokens, lr=lr, seed=seed, template=template,
                          patience=patience, tol=tol, prefix=suffix_unsupported(pipe) is not None)


@register("inversion")
class InversionAttack(Attack):
    order = 20
    needs_world = True

    @dataclass(frozen=True)
    class Budget:
        tokens: int = knob(2, "inv_tokens")
        steps: int = knob(40, "inv_steps")
        images: int = knob(8, "inv_images")  # images of the concept it learns from
        seed: int = knob(0, "seed", any_int=True)

    def invert(self, t: Target, offset: int = 0, **steps) -> SoftPrompt | SoftPrefix:
        """One inversion; offset moves its seed (images and initial tokens) from the budget's."""
        seed = self.b.seed + offset
        images = t.world.concept_images(t.concept, self.b.images, seed)
        return textual_inversion(t.pipe, images, n_tokens=self.b.tokens, seed=seed, **steps)

    def run(self, t: Target) -> Outcome:
        return self.attacked(t, self.invert(t, steps=self.b.steps))

    @staticmethod
    def attacked(t: Target, soft: SoftPrompt | SoftPrefix, **extra) -> Outcome:
        with torch.no_grad():
            cond = soft_cond(t.pipe, soft, [TEMPLATE] * len(t.rep))
        return Outcome(generate(t.pipe, t.rep, t.rep_seeds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled),
                       t.base_hits, extra)

    def describe(self, extra: dict) -> str:
        return f"ASR, textual inversion ({self.b.tokens} tokens, {self.b.steps} steps, {self.b.images} images)"


@register("inversion_converged")
class ConvergedInversionAttack(InversionAttack):
    order = 30
    by_default = False  # long: until the loss stops falling

    @dataclass(frozen=True)
    class Budget:
        tokens: int = knob(2, "inv_tokens")
        images: int = knob(8, "inv_images")
        # until the loss's moving average stops falling by > tol in `patience` steps, max_steps at most
        max_steps: int = knob(2000, "invc_max_steps")
        patience: int = knob(100, "invc_patience")
        tol: float = knob(0.01, "invc_tol")
        # independent inversions (seeds seed, seed + 1, ...), their generations pooled: one inversion is one
        # optimisation per concept, and on the same toy Kiko patch its ASR went 75 / 25 / 50 % with the seed
        restarts: int = knob(3, "invc_restarts")
        seed: int = knob(0, "seed", any_int=True)

    def run(self, t: Target) -> Outcome:
        runs = []
        for r in range(self.b.restarts):
            soft = self.invert(t, r, steps=self.b.max_steps, patience=self.b.patience, tol=self.b.tol)
            runs.append((self.attacked(t, soft).images, len(soft.losses)))
        return Outcome(np.concatenate([im for im, _ in runs]), np.tile(t.base_hits, len(runs)),
                       {"steps": [n for _, n in runs]})

    def describe(self, extra: dict) -> str:
        return (f"ASR, textual inversion run until its loss plateaus ({self.b.tokens} tokens, {self.b.images} "
                f"images; {self.b.restarts} inversions a concept, their generations pooled; steps taken: "
                f"{extra.get('steps')})")
