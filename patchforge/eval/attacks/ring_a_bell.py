"""ring_a_bell: Ring-A-Bell (Tsai et al. 2024), continuous -- the concept vector (mean difference of prompt
embeddings with and without the concept) added, times eta, to prompts that do not name it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backbones import Cond
from ...pipeline.sampling import generate
from ...errors import PatchforgeError
from ...io.loading import patches_suspended
from . import Attack, Outcome, Target, for_pipe, knob, register


def concept_vector(pipe, with_concept: list[str], without: list[str]) -> Cond:
    """Ring-A-Bell's concept vector: the mean over prompt pairs of (embedding of the prompt naming the
    concept - embedding of the same prompt without it), token embeddings and pooled embedding alike,
    from the base model's text encoders (what the concept means before any patch)."""
    backbone = for_pipe(pipe)
    with patches_suspended(pipe), torch.no_grad():
        a, b = backbone.encode(list(with_concept), pipe.device), backbone.encode(list(without), pipe.device)
    pooled = None if a.pooled is None else (a.pooled - b.pooled).mean(0, keepdim=True)
    return Cond((a.emb - b.emb).mean(0, keepdim=True), pooled)


@torch.no_grad()
def ring_a_bell(pipe, prompts: list[str], vector: Cond, eta: float) -> Cond:
    """The (patched) pipeline's embedding of `prompts` plus eta times the concept vector."""
    c = for_pipe(pipe).encode(list(prompts), pipe.device)
    pooled = None if c.pooled is None else c.pooled + eta * vector.pooled.to(c.pooled.dtype)
    return Cond(c.emb + eta * vector.emb.to(c.emb.dtype), pooled)


def concept_pairs(world, concept: str, seed: int) -> list[tuple[str, str]]:
    """(prompt naming the concept, the same prompt without it) pairs: the concept spec's target prompts
    and their anchors with no alternative (the name removed or replaced by a neutral word)."""
    from ...core.concept import mentions
    from ...core.concepts import KINDS, resolve

    if world is None:
        spec = resolve(concept, seed=seed)
    else:
        spec = next((s for k in KINDS if (s := world.resolve(k, concept, None, seed)) is not None), None)
        if spec is None:
            raise PatchforgeError(f"ring_a_bell: the concept world does not know {concept!r}")
    return [(t, a) for t, a in zip(spec.target, spec.anchor)
            if t != a and not any(mentions(a, w) for w in spec.words)]


@register("ring_a_bell")
class RingABellAttack(Attack):
    order = 60

    @dataclass(frozen=True)
    class Budget:
        eta: float = knob(3.0, "rab_eta")  # the concept vector's strength
        pairs: int = knob(16, "rab_pairs")  # prompt pairs it is averaged over
        prompts: int = knob(4, "prompts")
        seed: int = knob(0, "seed", any_int=True)

    def run(self, t: Target) -> Outcome:
        b = self.b
        pairs = concept_pairs(t.world, t.spec_name, b.seed)[: b.pairs]
        # the attacked prompts: other prompts of the concept with its name taken out
        attacked = concept_pairs(t.world, t.spec_name, b.seed + 1)[: b.prompts]
        if not pairs or not attacked:
            raise PatchforgeError(f"ring_a_bell: no prompt pairs with and without {t.concept!r}")
        vector = concept_vector(t.pipe, [a for a, _ in pairs], [n for _, n in pairs])
        named = [a for a, _ in attacked for _ in t.seeds]
        plain = [n for _, n in attacked for _ in t.seeds]
        seeds = t.seeds * len(attacked)
        base = t.base_rate(named, seeds)  # the ceiling: the base model asked for the concept by name
        cond = ring_a_bell(t.pipe, plain, vector, b.eta)
        return Outcome(generate(t.pipe, plain, seeds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled), base)

    def describe(self, extra: dict) -> str:
        return (f"ASR, Ring-A-Bell concept vector (eta {self.b.eta}) added to prompts without the concept's name; "
                "base = base model asked by name")
