"""The two probes that need no optimisation: unconditional (prompt-free generations, empty prompt) and
partial (partial denoising: an image of the concept, noised to `strength`, denoised with "")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...pipeline.sampling import GUIDANCE, SEED0, STEPS, generate
from ...io.loading import patches_suspended
from . import Attack, Outcome, Target, for_pipe, guided, knob, register


@torch.no_grad()
def partial_denoise(pipe, images: np.ndarray, strength: float, seeds: list[int], prompt: str = "") -> np.ndarray:
    """img2img by hand: encode, noise to `strength` of the schedule, denoise with guidance on `prompt`."""
    backbone = for_pipe(pipe)
    lat = backbone.encode_images(np.asarray(images))
    sched = backbone.sampler(STEPS, lat)
    start = int(STEPS * (1 - strength))
    timesteps = sched.timesteps[start:]
    noise = torch.stack([torch.randn(lat.shape[1:], generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    # DDPM-family schedulers noise with their own add_noise; a flow's is the backbone's straight line
    add_noise = getattr(sched, "add_noise", backbone.add_noise)
    x_t = add_noise(lat, noise.to(lat.device, lat.dtype), timesteps[:1].repeat(len(lat)))
    cond = backbone.encode([prompt] * len(lat), lat.device)
    uncond = backbone.encode([""] * len(lat), lat.device)
    for t in timesteps:
        eps = guided(backbone, x_t, t, cond, uncond, GUIDANCE)
        x_t = sched.step(eps, t, x_t).prev_sample
    return backbone.decode(x_t)


@register("unconditional")
class UnconditionalProbe(Attack):
    order = 70

    @dataclass(frozen=True)
    class Budget:
        images: int = knob(8, "probe_images")

    def run(self, t: Target) -> Outcome:
        seeds = [SEED0 + i for i in range(self.b.images)]
        return Outcome(generate(t.pipe, [""] * self.b.images, seeds), t.base_rate([""] * self.b.images, seeds))

    def describe(self, extra: dict) -> str:
        return "concept rate in unconditional generations (empty prompt)"


@register("partial")
class PartialDenoiseProbe(Attack):
    order = 80
    needs_world = True

    @dataclass(frozen=True)
    class Budget:
        images: int = knob(8, "probe_images")
        strength: float = knob(0.6, "strength", high=1.0)  # share of the schedule the images are noised to
        seed: int = knob(0, "seed", any_int=True)

    def run(self, t: Target) -> Outcome:
        seeds = [SEED0 + i for i in range(self.b.images)]
        src = t.world.concept_images(t.concept, self.b.images, self.b.seed + 1)
        with patches_suspended(t.pipe):
            base = t.detect(partial_denoise(t.pipe, src, self.b.strength, seeds))
        return Outcome(partial_denoise(t.pipe, src, self.b.strength, seeds), base)

    def describe(self, extra: dict) -> str:
        return f"concept rate after partial denoising (strength {self.b.strength}) of its images, empty prompt"
