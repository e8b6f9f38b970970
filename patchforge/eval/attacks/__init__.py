"""`patchforge attack`: try to bring an erased concept back, and report the attack success rate (ASR:
share of target prompt x seed generations where the judge sees the concept again).

Like the methods (patchforge/methods/), each attack is one module of this package, registered by name:
a class with a typed `Budget` dataclass (its knobs, their defaults and their `--budget` keys), `run()`
(one concept's attacked images, and the unattacked rate to compare with) and `describe()` (what its
metric means). Dropping a file here adds an attack; `run_attacks` is one loop over the chosen ones.

Soft tokens (patchforge/core/soft_tokens.py) enter through a forward hook on the text encoders' token-
embedding tables, so the same code serves the attacks, robust training (patchforge/train/robust.py) and
fmn's concept inversion. The suffix (soft_prompt) supports SD 1.x / 2.x; the prefix (unlearndiff, and
inversion where there are several text encoders) and the concept vector (ring_a_bell) work on every
family through the backbone's prompt encoding.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ...backbones import for_pipe
from ...core import worlds
from ...core.atomic import write_text
from ...core.concepts import resolve
from ...core.output_paths import check_output_file
from ...core.pipeline_loading import load_pipeline
from ...core.registry import import_modules, registrar
from ...errors import PatchforgeError
from ...io.loading import patches_suspended
from ...pipeline.sampling import GUIDANCE, SEED0, generate
from ...pipeline.soft_tokens import suffix_unsupported
from ..judging import default_judge, load_judge
from ..rows import load_patch, patch_targets, unload_patch
from ..stats import metric

ATTACKS: dict[str, type] = {}
EVAL_ATTACKS = ("soft_prompt", "inversion", "unconditional", "partial")  # what `patchforge eval --attacks` runs


register = registrar(__name__, "ATTACKS")


def _discover() -> None:
    import_modules(__name__)


def available() -> list[str]:
    """Every attack's name, in the order they run."""
    _discover()
    return sorted(ATTACKS, key=lambda n: (ATTACKS[n].order, n))


def get_attack(name: str) -> type:
    _discover()
    if name not in ATTACKS:
        raise PatchforgeError(f"unknown attack(s) {name}: use {', '.join(available())}")
    return ATTACKS[name]


def help_text() -> str:
    """`--attack`'s help, from the registry."""
    default = [n for n in available() if ATTACKS[n].by_default]
    extra = [n for n in available() if not ATTACKS[n].by_default]
    return (f"one of {', '.join(available())} (repeatable; default: {', '.join(default)}"
            + (f"; {', '.join(extra)} only when named" if extra else "") + ")")


# ---------------------------------------------------------------- budgets
def knob(default, key: str, *, high: float | None = None, choices: tuple[str, ...] = (), any_int: bool = False):
    """One budget field: its default, its `--budget` key, and what it may be beyond its type (whole numbers
    >= 1 and numbers > 0 unless said otherwise; `high`: an upper bound, inclusive; `choices`: for words)."""
    return field(default=default, metadata={"key": key, "high": high, "choices": choices, "any_int": any_int})


@dataclass(frozen=True)
class SharedBudget:
    """The knobs every attack reads."""
    prompts: int = knob(4, "prompts")  # target prompts per concept
    seed: int = knob(0, "seed", any_int=True)


def _knobs(budget_cls) -> dict[str, dataclasses.Field]:
    return {f.metadata["key"]: f for f in dataclasses.fields(budget_cls)}


def default_budget() -> dict:
    """Every `--budget` key with its default. Two attacks may share a key (inversion_converged reads
    inversion's token and image counts): they must agree on its default."""
    out = {k: f.default for k, f in _knobs(SharedBudget).items()}
    for name in available():
        for key, f in _knobs(ATTACKS[name].Budget).items():
            if out.setdefault(key, f.default) != f.default:
                raise RuntimeError(f"budget key {key}: attacks disagree on its default")
    return out


def _check_value(key: str, value, f: dataclasses.Field) -> None:
    meta, default = f.metadata, f.default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if meta["choices"]:
        if value not in meta["choices"]:
            raise PatchforgeError(f"budget {key} must be {' or '.join(map(repr, meta['choices']))}, not {value!r}")
    elif meta["any_int"]:
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise PatchforgeError(f"budget {key} must be a whole number, not {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < 1:
            raise PatchforgeError(f"budget {key} must be a whole number >= 1, not {value!r}")
    elif meta["high"] is not None:
        if not number or not 0 < value <= meta["high"]:
            raise PatchforgeError(f"budget {key} must be a number in (0, {meta['high']:g}], not {value!r}")
    elif value is not None or default is not None:  # an optional number may stay None (a computed default)
        if not number or value <= 0:
            raise PatchforgeError(f"budget {key} must be a number > 0, not {value!r}")


def check_budget(budget: dict, which=None) -> dict:
    """The full budget (defaults filled in), or a one-line PatchforgeError: an unknown key or attack, or a
    value of the wrong kind. Checked before any model loads."""
    defaults = default_budget()
    unknown = set(budget) - set(defaults)
    if unknown:
        raise PatchforgeError(f"unknown budget key(s) {', '.join(sorted(unknown))}: use {', '.join(defaults)}")
    bad = [a for a in which or () if a not in ATTACKS]
    if bad:
        raise PatchforgeError(f"unknown attack(s) {', '.join(bad)}: use {', '.join(available())}")
    full = {**defaults, **budget}
    fields = {**_knobs(SharedBudget), **{k: f for n in available() for k, f in _knobs(ATTACKS[n].Budget).items()}}
    for key, f in fields.items():
        _check_value(key, full[key], f)
    return full


def typed(budget_cls, flat: dict):
    """A Budget dataclass from the flat `--budget` dict."""
    return budget_cls(**{f.name: flat[f.metadata["key"]] for f in dataclasses.fields(budget_cls)})


# ---------------------------------------------------------------- one attack
@dataclass
class Target:
    """One concept under attack, and what every attack on it shares."""
    pipe: object
    judge: object
    concept: str  # the name the judge is asked about
    spec_name: str  # what concept_pairs resolves: a world's name, or the "kind:name" spec
    prompts: list[str]  # the target prompts
    seeds: list[int]
    world: object  # the concept world, or None for catalogue concepts
    negative: str | None
    shared: SharedBudget

    @property
    def rep(self) -> list[str]:  # every prompt once per seed
        return [p for p in self.prompts for _ in self.seeds]

    @property
    def rep_seeds(self) -> list[int]:
        return self.seeds * len(self.prompts)

    def detect(self, images) -> np.ndarray:
        return np.array(self.judge.detect(images, self.concept), float)

    @functools.cached_property
    def base_hits(self) -> np.ndarray:
        """The base model's hits on the target prompts and seeds, unattacked (made once per concept)."""
        return self.base_rate(self.rep, self.rep_seeds)

    def base_rate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """The judge's hits on the base model's generations (every patch suspended)."""
        with patches_suspended(self.pipe):
            return self.detect(generate(self.pipe, prompts, seeds))


@dataclass
class Outcome:
    """What an attack made of one concept: the attacked images and the unattacked hits to compare with."""
    images: np.ndarray
    base: np.ndarray
    extra: dict = field(default_factory=dict)  # per-concept numbers to report (inversion_converged's steps)


class Attack:
    name: ClassVar[str]
    Budget: ClassVar[type] = SharedBudget
    order: ClassVar[int] = 50  # run order (and report order)
    by_default: ClassVar[bool] = True  # run when no --attack is named
    needs_world: ClassVar[bool] = False  # needs images of the concept: skipped for catalogue concepts
    soft_suffix: ClassVar[bool] = False  # a token suffix: SD 1.x / 2.x only (core/soft_tokens.py)
    per_concept: ClassVar[bool] = True  # False: run_all() attacks every concept at once (text)

    def __init__(self, budget):
        self.b = budget

    def run(self, target: Target) -> Outcome:
        raise NotImplementedError

    def run_all(self, pipe, targets, judge, seeds: int, world, shared: SharedBudget) -> dict[str, dict]:
        raise NotImplementedError

    def describe(self, extra: dict) -> str:
        raise NotImplementedError


def guided(backbone, x, t, cond, uncond, guidance):
    """Classifier-free guided prediction; the unconditional branch carries no gradient. A guidance-distilled
    model (FLUX.1-dev) predicts the guided result itself."""
    if backbone.guidance_distilled:
        return backbone.predict(x, t, cond)
    with torch.no_grad():
        eu = backbone.predict(x, t, uncond)
    ec = backbone.predict(x, t, cond)
    return eu + guidance * (ec - eu)


# ---------------------------------------------------------------- running attacks
def run_attacks(pipe, targets: list[str], judge, budget: dict | None = None, seeds: int = 2, world="default",
                negative: str | None = None, which: tuple[str, ...] = EVAL_ATTACKS) -> dict:
    """The attacks `which` on the pipeline as it is now (patch loaded, or `negative` prompt) ->
    {result name: {"metric": {...base, patched (= ASR), change, CI}, "images", "seconds"}} (the text attack
    gives one metric per kind of rewording, without images). 'base' is the frozen base model's rate on the
    same prompts and seeds, unattacked. `world`: the concept world of the targets (patchforge.core.worlds;
    "default": the embedded default model's), None for catalogue concepts ("kind:name" specs)."""
    world = worlds.for_model(None) if world == "default" else world
    flat = check_budget(budget or {}, which)
    shared = typed(SharedBudget, flat)
    chosen = [ATTACKS[n](typed(ATTACKS[n].Budget, flat)) for n in available() if n in which]
    out = {}
    for attack in (a for a in chosen if not a.per_concept):
        out.update(attack.run_all(pipe, targets, judge, seeds, world, shared))
    results: dict[str, dict] = {}
    for concept in targets:
        target = _target(pipe, judge, concept, world, shared, seeds, negative)
        for attack in chosen:
            if not attack.per_concept or (attack.needs_world and world is None):
                continue
            t0 = time.perf_counter()
            outcome = attack.run(target)
            r = results.setdefault(attack.name, {"hits": [], "base": [], "seconds": 0.0, "extra": {}})
            r["hits"].append(target.detect(outcome.images))
            r["base"].append(outcome.base)
            r.setdefault("images", outcome.images)  # the first concept's, to show
            r["seconds"] += time.perf_counter() - t0
            for k, v in outcome.extra.items():
                r["extra"].setdefault(k, []).append(v)
    for attack in chosen:
        if attack.name in results:
            r = results[attack.name]
            out[attack.name] = {"metric": metric(np.concatenate(r["base"]), np.concatenate(r["hits"]), "lower",
                                                 attack.describe(r["extra"])),
                                "images": r["images"], "seconds": round(r["seconds"], 1), **r["extra"]}
    return out


def _target(pipe, judge, concept: str, world, shared: SharedBudget, seeds: int, negative) -> Target:
    spec_name = concept
    if world is not None:
        prompts = world.attack_prompts(concept, shared.prompts)
    else:  # a "kind:name" spec; the judge is asked about the concept's name
        spec = resolve(concept)
        prompts, concept = spec.target[:shared.prompts], spec.name
    return Target(pipe, judge, concept, spec_name, prompts, [SEED0 + s for s in range(seeds)], world, negative,
                  shared)


# ---------------------------------------------------------------- CLI
def attack_patch(path, model=None, budget=None, seeds: int = 2, which=None, judge=None, pipe=None) -> dict:
    """Load the patch, run the attacks (`which`, default: every attack's by_default), return
    {attack: metric} (+ seconds)."""
    asked = which
    flat = check_budget(budget or {}, which)
    which = tuple(which or [a for a in available() if ATTACKS[a].by_default])
    world = worlds.for_model(model)
    targets = patch_targets(path, world)  # checked before any load
    judge = judge or default_judge(model)
    pipe = pipe or load_pipeline(model, device="cpu" if world else None)
    skipped = {}
    if not asked and suffix_unsupported(pipe):  # by default, run what this family supports; asked for, it fails
        skipped = {a: suffix_unsupported(pipe) for a in which if ATTACKS[a].soft_suffix}
        which = tuple(a for a in which if a not in skipped)
    t0 = time.perf_counter()
    name, _ = load_patch(pipe, path)
    try:
        results = run_attacks(pipe, targets, judge, budget, seeds, world, which=which)
    finally:
        unload_patch(pipe, name)
    out = {k: {**v["metric"], **{x: v[x] for x in v if x not in ("metric", "images")}} for k, v in results.items()}
    return {"patch": Path(path).name, "concepts": targets, "budget": flat, "seeds": seeds, "attacks": out,
            "seconds": round(time.perf_counter() - t0, 1), **({"skipped": skipped} if skipped else {})}


def run_command(args) -> int:
    if not Path(args.patch).exists():
        raise PatchforgeError(f"no patch at {args.patch}")
    budget = dict(args.budget)
    check_budget(budget, args.attack)
    out = check_output_file(args.out or Path(args.patch).with_suffix(".attack.json"), "--out")

    res = attack_patch(args.patch, args.model, budget, args.seeds, args.attack or None,
                       load_judge(args.judge) if args.judge else None)
    write_text(out, json.dumps(res, indent=1, sort_keys=True) + "\n")
    print("| attack | base rate | ASR (patched) | 95% CI |\n|---|---|---|---|")
    for k, m in res["attacks"].items():
        ci = m["ci_patched"]
        steps = f" (steps: {', '.join(map(str, m['steps']))})" if "steps" in m else ""
        print(f"| {k}{steps} | {m['base']:.0%} | {m['patched']:.0%} | [{ci[0]:.0%}, {ci[1]:.0%}] |")
    for k, why in res.get("skipped", {}).items():
        print(f"| {k} | skipped: {why} |||")
    print(f"wrote {out} ({res['seconds']} s)")
    return 0


__all__ = ["ATTACKS", "Attack", "EVAL_ATTACKS", "Outcome", "SharedBudget", "Target", "attack_patch", "available",
           "check_budget", "default_budget", "for_pipe", "get_attack", "guided", "knob", "register", "run_attacks",
           "typed", "GUIDANCE"]
