"""unlearndiff: UnlearnDiffAtk (Zhang et al. 2023) at its published budget, per prompt -- for each target
prompt its own K-token prefix, optimised so that the patched model, used as a diffusion classifier,
denoises an image of the concept best when prompted "<prefix> prompt". unlearndiff_strong: the same with a
larger budget (more tokens, steps and target images)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...pipeline.sampling import generate, generate_latents
from ...pipeline.soft_tokens import unlearndiff_attack
from ...errors import PatchforgeError
from ...io.loading import patches_suspended
from . import Attack, Outcome, Target, for_pipe, knob, register

SOURCES = ("base", "world")


def target_latents(pipe, prompts: list[str], per_prompt: int, seed: int = 0, source: str = "base", world=None,
                   concept: str | None = None) -> torch.Tensor:
    """The attack's images of the concept, `per_prompt` for each prompt in a row, as clean latents:
    "base": the base model's own generations of the prompt (seeds apart from the judged ones);
    "world": the concept world's real images of the concept."""
    if source == "world":
        if world is None:
            raise PatchforgeError("ud_source=world needs a concept world (the toy model); use ud_source=base")
        images = world.concept_images(concept, len(prompts) * per_prompt, seed + 2)
        return for_pipe(pipe).encode_images(images)
    rep = [p for p in prompts for _ in range(per_prompt)]
    with patches_suspended(pipe):
        latents = generate_latents(pipe, rep, [seed * 7919 + i for i in range(len(rep))], batch=len(rep))
    return latents.to(pipe.device)


@register("unlearndiff")
class UnlearnDiffAttack(Attack):
    order = 40

    @dataclass(frozen=True)
    class Budget:  # the published budget (OPTML-Group/Diffusion-MU-Attack): 5 tokens, 40 steps, lr 0.01, 1 image
        tokens: int = knob(5, "ud_tokens")
        steps: int = knob(40, "ud_steps")
        lr: float = knob(0.01, "ud_lr")
        images: int = knob(1, "ud_images")  # target images per prompt
        source: str = knob("base", "ud_source", choices=SOURCES)  # the base model's generations, or the world's
        seed: int = knob(0, "seed", any_int=True)

    def run(self, t: Target) -> Outcome:
        b = self.b
        latents = target_latents(t.pipe, t.prompts, b.images, b.seed, b.source, t.world, t.concept)
        soft = unlearndiff_attack(t.pipe, t.prompts, latents, steps=b.steps, n_tokens=b.tokens, lr=b.lr, seed=b.seed)
        with torch.no_grad():
            cond = soft.encode(t.rep, [i for i in range(len(t.prompts)) for _ in t.seeds])
        negative = [t.negative] * len(t.rep) if t.negative else None
        return Outcome(generate(t.pipe, t.rep, t.rep_seeds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled,
                                negative=negative), t.base_hits)

    def describe(self, extra: dict) -> str:
        b = self.b
        return (f"ASR, UnlearnDiffAtk per prompt ({b.tokens}-token prefix, {b.steps} steps, lr {b.lr}, "
                f"{b.images} target image(s) per prompt)")


@register("unlearndiff_strong")
class StrongUnlearnDiffAttack(UnlearnDiffAttack):
    order = 50
    by_default = False  # long

    @dataclass(frozen=True)
    class Budget:
        tokens: int = knob(8, "uds_tokens")
        steps: int = knob(120, "uds_steps")
        lr: float = knob(0.01, "uds_lr")
        images: int = knob(2, "uds_images")
        source: str = knob("base", "ud_source", choices=SOURCES)
        seed: int = knob(0, "seed", any_int=True)

    def describe(self, extra: dict) -> str:
        b = self.b
        return (f"ASR, UnlearnDiffAtk per prompt, stronger ({b.tokens}-token prefix, {b.steps} steps, lr {b.lr}, "
                f"{b.images} target images per prompt)")
