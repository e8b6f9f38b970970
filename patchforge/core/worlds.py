"""Concept worlds: plug-ins that bring their own concepts, prompt sets and judge for the base models
they know. The toy world (patchforge/toyworld) is one; the real-model catalogue in concepts.py is the
default when no world claims a model or a concept.

This is the one module outside a world's package that names it. A world is a class with:

    name                       its key here ("toy")
    title                      how an error names its models ("the toy model (world v1)")
    knows_model(model)         True for the base models drawn from this world: the one place that decides
    knows_family(family)       True for a model family (backbones.FamilyDefaults.key) whose models know it
    resolve(kind, name, to, seed) -> ConceptSpec or None (not one of its concepts)
    known_names(kind)          its concepts of a kind (for "did you mean" hints)
    general_prompts()          one prompt per concept: what a Fisher estimate averages over
    eval_rows(targets, n, avoid)  the eval's prompt sets for an erasure of `targets`; kept concepts get fresh
                               prompts for those among `avoid` (the prompts the patch trained on)
    kind_of(concept), neighbours(concept)  a concept's kind and the near neighbours an erasure must keep
    attack_prompts(concept, n) the target prompts white-box attacks start from
    text_attacks(concept, n)   prompts asking for the concept without its exact wording
    concept_images(concept, n, seed)  real images of the concept (inversion and partial denoising)
    neutral(concept)           (words, labels): what an erasure should leave in the concept's place
    real_features(judge)       judge features of real images (the Fréchet reference)
    judge(arg)                 its judge ("toy:PATH" -> arg PATH); default_judge(model)

Imports here are deferred: `patchforge --help` reads only COMMANDS.
"""
from __future__ import annotations

import importlib

# The toy worlds: v1 (the embedded toy model) and v2 (`patchforge toy train --world v2`); a model is claimed
# by one of them only (knows_model), so its concepts come from its own world.
PLUGINS = {"toy": "patchforge.toyworld.plugin:ToyWorld", "toy-v2": "patchforge.toyworld.plugin:ToyWorldV2"}
# CLI verb -> ("module:register" declaring it on the subparsers, one-line help): the worlds' own verbs
COMMANDS = {"toy": ("patchforge.toyworld.commands:register",
                    "the embedded toy text-to-image world: rebuild or measure it")}
_loaded: dict[str, object] = {}


def get(name: str):
    """The world registered as `name`."""
    if name not in _loaded:
        module, _, cls = PLUGINS[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def all_worlds() -> list:
    return [get(name) for name in PLUGINS]


def for_model(model) -> object | None:
    """The world a base model comes from, or None for a real model (the catalogue's concepts)."""
    return next((w for w in all_worlds() if w.knows_model(model)), None)


def for_family(family: str) -> object | None:
    """The world whose models are of this family (a backbones.FamilyDefaults.key), or None."""
    return next((w for w in all_worlds() if w.knows_family(family)), None)


def resolve(kind: str, name: str, to: str | None, seed: int, world_name: str | None = None):
    """The spec of the concept in the world named `world_name` (the model's: "kiko" is in both toy worlds,
    with different prompts), or, with None, in the first world that knows it; None when none does."""
    for w in all_worlds():
        if world_name not in (None, w.name):
            continue
        spec = w.resolve(kind, name, to, seed)
        if spec is not None:
            return spec
    return None


def known_names(kind: str, name: str | None = None) -> list[str]:
    """Concept names of a kind in the world `name`, or in every world."""
    return [n for w in all_worlds() if name in (None, w.name) for n in w.known_names(kind)]

