"""`patchforge attack`: try to bring an erased concept back, white-box, and report the attack success
rate (ASR: share of target prompt x seed generations where the judge sees the concept again).

    text          misspellings, paraphrases, synonyms / descriptions without the name, prompt padding
    soft_prompt   UnlearnDiffAtk-style: optimise K continuous token embeddings appended to the target
                  prompts so the patched model's guided noise prediction matches the frozen base
                  model's for the plain prompt (the models' own denoising, no judge in the loop)
    inversion     textual inversion: K new token embeddings learnt on images of the concept with the
                  patched model's denoising loss, then "a photo of <tokens>"
    inversion_converged  the same, run until its loss plateaus (a step cap), reporting the steps it took
    unlearndiff   UnlearnDiffAtk (Zhang et al. 2023) at its published budget, per prompt: for each target
                  prompt its own K-token prefix, optimised so that the patched model -- used as a diffusion
                  classifier -- denoises an image of the concept best when prompted "<prefix> prompt"
    unlearndiff_strong  the same with a larger budget (more tokens, steps and target images)
    ring_a_bell   Ring-A-Bell (Tsai et al. 2024), continuous: the concept vector (mean difference of prompt
                  embeddings with and without the concept) added, times eta, to prompts that do not name it
    unconditional prompt-free generations (empty prompt)
    partial       partial denoising: an image of the concept, noised to `strength`, denoised with ""

Soft tokens (patchforge/core/soft_tokens.py) enter through a forward hook on the text encoders' token-embedding
tables, so the same code serves the attacks, robust training (patchforge/train/robust.py) and fmn's concept
inversion. The suffix (soft_prompt, inversion) supports SD 1.x / 2.x; the prefix (unlearndiff) and the concept
vector (ring_a_bell) work on every family through the backbone's prompt encoding.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import worlds
from ..core.atomic import write_text
from ..core.output_paths import check_output_file
from ..backbones import for_pipe
from ..errors import PatchforgeError
from ..io.loading import patches_suspended
from ..core.generate import GUIDANCE, SEED0, STEPS, empty_embeds, generate, generate_latents
from .rows import Row, load_patch, patch_targets, run_rows, unload_patch
from ..core.cond import Cond
from ..core.soft_tokens import SoftPrefix, SoftPrompt, invert_latents
from ..core.soft_tokens import unsupported as soft_unsupported
from .stats import metric
from .text_attacks import catalogue_attacks

DEFAULT_BUDGET = {"prompts": 4, "soft_tokens": 4, "soft_steps": 30, "soft_lr": None, "inv_tokens": 2,
                  "inv_steps": 40, "inv_images": 8, "probe_images": 8, "strength": 0.6, "seed": 0,
                  # inversion_converged: until the loss's moving average stops falling by > tol in `patience` steps
                  "invc_max_steps": 2000, "invc_patience": 100, "invc_tol": 0.01,
                  # UnlearnDiffAtk's published budget (OPTML-Group/Diffusion-MU-Attack: 5 prefix tokens, 40
                  # iterations, Adam lr 0.01 on the embeddings, one target image), and a stronger one
                  "ud_tokens": 5, "ud_steps": 40, "ud_lr": 0.01, "ud_images": 1,
                  "uds_tokens": 8, "uds_steps": 120, "uds_lr": 0.01, "uds_images": 2,
                  "ud_source": "base",  # target images: the base model's generations of the prompt, or "world"'s
                  # Ring-A-Bell: strength of the concept vector, prompt pairs it is averaged over
                  "rab_eta": 3.0, "rab_pairs": 16}
WHITE_BOX = ("soft_prompt", "inversion", "inversion_converged", "unlearndiff", "unlearndiff_strong", "ring_a_bell",
             "unconditional", "partial")
ATTACKS = ("text",) + WHITE_BOX
SOFT_SUFFIX = ("soft_prompt", "inversion", "inversion_converged")  # SD 1.x / 2.x only (core/soft_tokens.py)
UNLEARNDIFF = {"unlearndiff": "ud", "unlearndiff_strong": "uds"}  # attack -> prefix of its budget keys


def check_budget(budget: dict, which=None) -> dict:
    """The full budget (defaults filled in), or a one-line PatchforgeError: an unknown key or attack, or a
    value of the wrong kind. Checked before any model loads."""
    unknown = set(budget) - set(DEFAULT_BUDGET)
    if unknown:
        raise PatchforgeError(f"unknown budget key(s) {', '.join(sorted(unknown))}: use {', '.join(DEFAULT_BUDGET)}")
    bad = [a for a in which or () if a not in ATTACKS]
    if bad:
        raise PatchforgeError(f"unknown attack(s) {', '.join(bad)}: use {', '.join(ATTACKS)}")
    b = {**DEFAULT_BUDGET, **budget}
    counts = ("prompts", "soft_tokens", "soft_steps", "inv_tokens", "inv_steps", "inv_images", "probe_images",
              "invc_max_steps", "invc_patience", "ud_tokens", "ud_steps", "ud_images", "uds_tokens", "uds_steps",
              "uds_images", "rab_pairs")
    for key in counts:
        if isinstance(b[key], bool) or not isinstance(b[key], int) or b[key] < 1:
            raise PatchforgeError(f"budget {key} must be a whole number >= 1, not {b[key]!r}")
    for key in ("ud_lr", "uds_lr", "invc_tol", "rab_eta") + (("soft_lr",) if b["soft_lr"] is not None else ()):
        if isinstance(b[key], bool) or not isinstance(b[key], (int, float)) or b[key] <= 0:
            raise PatchforgeError(f"budget {key} must be a number > 0, not {b[key]!r}")
    if b["ud_source"] not in ("base", "world"):
        raise PatchforgeError(f"budget ud_source must be 'base' or 'world', not {b['ud_source']!r}")
    if isinstance(b["seed"], bool) or not isinstance(b["seed"], int):
        raise PatchforgeError(f"budget seed must be a whole number, not {b['seed']!r}")
    if isinstance(b["strength"], bool) or not isinstance(b["strength"], (int, float)) or not 0 < b["strength"] <= 1:
        raise PatchforgeError(f"budget strength must be a number in (0, 1], not {b['strength']!r}")
    return b


# ---------------------------------------------------------------- soft prompts
def guided(backbone, x, t, cond, uncond, guidance):
    """Classifier-free guided prediction; the unconditional branch carries no gradient. A guidance-distilled
    model (FLUX.1-dev) predicts the guided result itself."""
    if backbone.guidance_distilled:
        return backbone.predict(x, t, cond)
    with torch.no_grad():
        eu = backbone.predict(x, t, uncond)
    ec = backbone.predict(x, t, cond)
    return eu + guidance * (ec - eu)


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
        plain = empty_embeds(pipe, len(prompts), list(prompts))
        empty = empty_embeds(pipe, len(prompts))
        neg = empty_embeds(pipe, len(prompts), [negative] * len(prompts)) if negative else empty
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


def textual_inversion(pipe, images: np.ndarray, steps: int = 40, n_tokens: int = 2, lr: float | None = None,
                      seed: int = 0, template: str = "a photo of", patience: int = 0, tol: float = 0.01) -> SoftPrompt:
    """Learn K token embeddings that make the (patched) model denoise images of the concept:
    the plain diffusion loss ||eps_theta(x_t, "a photo of <v>") - eps||^2, as in textual inversion.
    patience > 0: until the loss plateaus, `steps` at most (core/soft_tokens.py's Plateau)."""
    latents = for_pipe(pipe).encode_images(np.asarray(images))
    return invert_latents(pipe, latents, steps=steps, n_tokens=n_tokens, lr=lr, seed=seed, template=template,
                          patience=patience, tol=tol)


# ---------------------------------------------------------------- UnlearnDiffAtk, per prompt
def prefix_objective(pipe, soft: SoftPrefix, prompts: list[str], latents: torch.Tensor, seed: int = 0,
                     grad: bool = False) -> torch.Tensor:
    """UnlearnDiffAtk's objective, per prompt: the patched model's denoising loss on its target images (a
    diffusion classifier's score for "this image is what '<prefix> prompt' shows"), at one random timestep
    and noise per image drawn from `seed`. latents: len(prompts) * m clean latents, prompt i's m in a row."""
    backbone = for_pipe(pipe)
    m = len(latents) // len(prompts)
    sets = [i for i in range(len(prompts)) for _ in range(m)]
    x_t, t, noise = backbone.noised(latents, torch.Generator("cpu").manual_seed(seed))
    target = backbone.training_target(latents, noise, t)
    with torch.set_grad_enabled(grad):
        pred = backbone.predict(x_t, t, soft.encode([prompts[i] for i in sets], sets))
        err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return err.view(len(prompts), m).mean(1)


def unlearndiff_attack(pipe, prompts: list[str], latents: torch.Tensor, steps: int = 40, n_tokens: int = 5,
                       lr: float = 0.01, seed: int = 0) -> SoftPrefix:
    """One K-token prefix per prompt (independent sets of one SoftPrefix), each optimised with Adam on its
    own prompt's prefix_objective: the prompts share a batch, not a prefix (the summed loss gives each
    set exactly its own prompt's gradient)."""
    soft = SoftPrefix(pipe, n_tokens, n_sets=len(prompts), seed=seed)
    params = list(soft.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss = prefix_objective(pipe, soft, prompts, latents, seed=seed * 100_003 + step, grad=True).sum()
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    return soft


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


# ---------------------------------------------------------------- Ring-A-Bell, continuous
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
    from ..core.concept import mentions
    from ..core.concepts import KINDS, resolve

    if world is None:
        spec = resolve(concept, seed=seed)
        words = spec.words
    else:
        spec = next((s for k in KINDS if (s := world.resolve(k, concept, None, seed)) is not None), None)
        if spec is None:
            raise PatchforgeError(f"ring_a_bell: the concept world does not know {concept!r}")
        words = spec.words
    return [(t, a) for t, a in zip(spec.target, spec.anchor)
            if t != a and not any(mentions(a, w) for w in words)]


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


# ---------------------------------------------------------------- running attacks
def run_attacks(pipe, targets: list[str], judge, budget: dict | None = None, seeds: int = 2, world="default",
                negative: str | None = None, which: tuple[str, ...] = ("soft_prompt", "inversion", "unconditional",
                                                                       "partial")) -> dict:
    """White-box attacks on the pipeline as it is now (patch loaded, or `negative` prompt) ->
    {attack: {"metric": {...base, patched (= ASR), change, CI}, "images": attacked images, "seconds"}}.
    'base' is the frozen base model's rate of the concept on the same prompts and seeds, unattacked.
    `world`: the concept world of the targets (patchforge.core.worlds; "default": the embedded default model's),
    None for catalogue concepts ("kind:name" specs)."""
    world = worlds.for_model(None) if world == "default" else world
    b = check_budget(budget or {}, which)
    seed_list = [SEED0 + s for s in range(seeds)]
    results = {}
    for concept in targets:
        spec_name = concept  # what concept_pairs resolves: a world's name, or the "kind:name" spec
        if world is not None:
            prompts = world.attack_prompts(concept, b["prompts"])
        else:  # a "kind:name" spec; the judge is asked about the concept's name
            from ..core.concepts import resolve
            spec = resolve(concept)
            prompts, concept = spec.target[:b["prompts"]], spec.name
        rep = [p for p in prompts for _ in seed_list]
        sds = seed_list * len(prompts)
        with patches_suspended(pipe):
            base_hit = np.array(judge.detect(generate(pipe, rep, sds), concept), float)

        def record(name, images, base, t0, **extra):
            hit = np.array(judge.detect(images, concept), float)
            r = results.setdefault(name, {"hits": [], "base": [], "images": images, "seconds": 0.0})
            r["hits"].append(hit)
            r["base"].append(base)
            r["seconds"] += time.perf_counter() - t0
            for k, v in extra.items():
                r.setdefault(k, []).append(v)

        if "soft_prompt" in which:
            t0 = time.perf_counter()
            soft = soft_prompt_attack(pipe, prompts, steps=b["soft_steps"], n_tokens=b["soft_tokens"], lr=b["soft_lr"],
                                      negative=negative, seed=b["seed"])
            with torch.no_grad():
                emb = soft.encode(pipe, rep)
            record("soft_prompt",
                   generate(pipe, rep, sds, prompt_embeds=emb, negative=[negative] * len(rep) if negative else None),
                   base_hit, t0)
        if world is not None and "inversion" in which:
            t0 = time.perf_counter()
            soft = textual_inversion(pipe, world.concept_images(concept, b["inv_images"], b["seed"]),
                                     steps=b["inv_steps"],
                                     n_tokens=b["inv_tokens"], seed=b["seed"])
            with torch.no_grad():
                emb = soft.encode(pipe, ["a photo of"] * len(rep))
            record("inversion", generate(pipe, rep, sds, prompt_embeds=emb), base_hit, t0)
        if world is not None and "inversion_converged" in which:
            t0 = time.perf_counter()
            soft = textual_inversion(pipe, world.concept_images(concept, b["inv_images"], b["seed"]),
                                     steps=b["invc_max_steps"], n_tokens=b["inv_tokens"], seed=b["seed"],
                                     patience=b["invc_patience"], tol=b["invc_tol"])
            with torch.no_grad():
                emb = soft.encode(pipe, ["a photo of"] * len(rep))
            record("inversion_converged", generate(pipe, rep, sds, prompt_embeds=emb), base_hit, t0,
                   steps=len(soft.losses))
        for name in (a for a in UNLEARNDIFF if a in which):
            t0 = time.perf_counter()
            k = UNLEARNDIFF[name]
            latents = target_latents(pipe, prompts, b[f"{k}_images"], b["seed"], b["ud_source"], world, concept)
            soft = unlearndiff_attack(pipe, prompts, latents, steps=b[f"{k}_steps"], n_tokens=b[f"{k}_tokens"],
                                      lr=b[f"{k}_lr"], seed=b["seed"])
            with torch.no_grad():
                cond = soft.encode(rep, [i for i in range(len(prompts)) for _ in seed_list])
            record(name, generate(pipe, rep, sds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled,
                                  negative=[negative] * len(rep) if negative else None), base_hit, t0)
        if "ring_a_bell" in which:
            t0 = time.perf_counter()
            pairs = concept_pairs(world, spec_name, b["seed"])[: b["rab_pairs"]]
            # the attacked prompts: other prompts of the concept with its name taken out
            attacked = concept_pairs(world, spec_name, b["seed"] + 1)[: b["prompts"]]
            if not pairs or not attacked:
                raise PatchforgeError(f"ring_a_bell: no prompt pairs with and without {concept!r}")
            vector = concept_vector(pipe, [a for a, _ in pairs], [n for _, n in pairs])
            named = [a for a, _ in attacked for _ in seed_list]
            plain = [n for _, n in attacked for _ in seed_list]
            rab_seeds = seed_list * len(attacked)
            with patches_suspended(pipe):  # the ceiling: the base model asked for the concept by name
                base_r = np.array(judge.detect(generate(pipe, named, rab_seeds), concept), float)
            cond = ring_a_bell(pipe, plain, vector, b["rab_eta"])
            record("ring_a_bell", generate(pipe, plain, rab_seeds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled),
                   base_r, t0)
        m = b["probe_images"]
        probe_seeds = [SEED0 + i for i in range(m)]
        if "unconditional" in which:
            t0 = time.perf_counter()
            with patches_suspended(pipe):
                base_u = np.array(judge.detect(generate(pipe, [""] * m, probe_seeds), concept), float)
            record("unconditional", generate(pipe, [""] * m, probe_seeds), base_u, t0)
        if world is not None and "partial" in which:
            t0 = time.perf_counter()
            src = world.concept_images(concept, m, b["seed"] + 1)
            with patches_suspended(pipe):
                base_p = np.array(judge.detect(partial_denoise(pipe, src, b["strength"], probe_seeds), concept), float)
            record("partial", partial_denoise(pipe, src, b["strength"], probe_seeds), base_p, t0)
    out = {}
    for name, r in results.items():
        what = {"soft_prompt": f"ASR, soft-prompt attack ({b['soft_tokens']} tokens, {b['soft_steps']} steps); "
                               "base = unattacked base model",
                "inversion": f"ASR, textual inversion ({b['inv_tokens']} tokens, {b['inv_steps']} steps, "
                             f"{b['inv_images']} images)",
                "inversion_converged": f"ASR, textual inversion run until its loss plateaus ({b['inv_tokens']} "
                                       f"tokens, {b['inv_images']} images; steps taken: {r.get('steps')})",
                "unlearndiff": f"ASR, UnlearnDiffAtk per prompt ({b['ud_tokens']}-token prefix, {b['ud_steps']} "
                               f"steps, lr {b['ud_lr']}, {b['ud_images']} target image(s) per prompt)",
                "unlearndiff_strong": f"ASR, UnlearnDiffAtk per prompt, stronger ({b['uds_tokens']}-token prefix, "
                                      f"{b['uds_steps']} steps, lr {b['uds_lr']}, {b['uds_images']} target images "
                                      "per prompt)",
                "ring_a_bell": f"ASR, Ring-A-Bell concept vector (eta {b['rab_eta']}) added to prompts without the "
                               "concept's name; base = base model asked by name",
                "unconditional": "concept rate in unconditional generations (empty prompt)",
                "partial": f"concept rate after partial denoising (strength {b['strength']}) of its images, "
                           "empty prompt"}[name]
        out[name] = {"metric": metric(np.concatenate(r["base"]), np.concatenate(r["hits"]), "lower", what),
                     "images": r["images"], "seconds": round(r["seconds"], 1),
                     **({"steps": r["steps"]} if "steps" in r else {})}
    return out


# ---------------------------------------------------------------- CLI
def attack_patch(path, model=None, budget=None, seeds: int = 2, which=None, judge=None, pipe=None) -> dict:
    """Load the patch, run the text and white-box attacks, return {attack: metric} (+ seconds)."""
    from .judging import default_judge
    from ..core.pipeline_loading import load_pipeline

    asked = which
    check_budget(budget or {}, which)
    # by default everything but the two long ones (inversion_converged, unlearndiff_strong): ask for those
    which = tuple(which or [a for a in ATTACKS if a not in ("inversion_converged", "unlearndiff_strong")])
    world = worlds.for_model(model)
    targets = patch_targets(path, world)  # checked before any load
    judge = judge or default_judge(model)
    pipe = pipe or load_pipeline(model, device="cpu" if world else None)
    skipped = {}
    if not asked and soft_unsupported(pipe):  # by default, run what this family supports; asked for, it fails
        skipped = {a: soft_unsupported(pipe) for a in SOFT_SUFFIX if a in which}
        which = tuple(a for a in which if a not in skipped)
    t0 = time.perf_counter()
    name, _ = load_patch(pipe, path)
    out = {}
    try:
        if "text" in which:
            b = {**DEFAULT_BUDGET, **(budget or {})}
            rows = []
            for c in targets:
                tmpl = None
                if world is None:  # a "kind:name" spec: attack the catalogue's prompts, judge by the concept's name
                    from ..core.concepts import resolve
                    spec = resolve(c)
                    c, tmpl = spec.name, spec.target
                variants = world.text_attacks(c, b["prompts"]) if world else catalogue_attacks(c, tmpl, b["prompts"])
                rows += [Row(f"attack:{a}", p, c) for a, ps in variants.items() for p in ps]
            patched = run_rows(pipe, judge, rows, seeds)
            with patches_suspended(pipe):
                base = run_rows(pipe, judge, rows, seeds)
            sets = np.array([r.set for r in rows for _ in range(seeds)])
            for s in dict.fromkeys(sets):
                m = sets == s
                out[s.split(":")[1]] = metric(base.scores["hit"][m], patched.scores["hit"][m], "lower",
                                               f"ASR, text attack '{s.split(':')[1]}'; base = base model, same prompts")
        wb = run_attacks(pipe, targets, judge, budget, seeds, world, which=which)
        out.update({k: {**v["metric"], "seconds": v["seconds"], **({"steps": v["steps"]} if "steps" in v else {})}
                    for k, v in wb.items()})
    finally:
        unload_patch(pipe, name)
    return {"patch": Path(path).name, "concepts": targets, "budget": {**DEFAULT_BUDGET, **(budget or {})},
            "seeds": seeds, "attacks": out, "seconds": round(time.perf_counter() - t0, 1),
            **({"skipped": skipped} if skipped else {})}


def run_command(args) -> int:
    if not Path(args.patch).exists():
        raise PatchforgeError(f"no patch at {args.patch}")
    budget = dict(args.budget)
    check_budget(budget, args.attack)
    out = check_output_file(args.out or Path(args.patch).with_suffix(".attack.json"), "--out")
    from .judging import load_judge

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
