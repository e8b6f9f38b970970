"""`patchforge attack`: try to bring an erased concept back, white-box, and report the attack success
rate (ASR: share of target prompt x seed generations where the judge sees the concept again).

    text          misspellings, paraphrases, synonyms / descriptions without the name, prompt padding
    soft_prompt   UnlearnDiffAtk-style: optimise K continuous token embeddings appended to the target
                  prompts so the patched model's guided noise prediction matches the frozen base
                  model's for the plain prompt (the models' own denoising, no judge in the loop)
    inversion     textual inversion: K new token embeddings learnt on images of the concept with the
                  patched model's denoising loss, then "a photo of <tokens>"
    unconditional prompt-free generations (empty prompt)
    partial       partial denoising: an image of the concept, noised to `strength`, denoised with ""

Soft tokens (patchforge/soft_tokens.py) enter through a forward hook on the text encoder's token-embedding
table, so the same code serves the attacks, robust training (patchforge/robust.py) and fmn's concept
inversion. SD 1.x / 2.x only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import worlds
from .atomic import write_text
from .backbones import for_pipe
from .errors import PatchforgeError
from .loading import patches_suspended
from .generate import GUIDANCE, SEED0, STEPS, empty_embeds, generate, generate_latents
from .rows import Row, load_patch, patch_concepts, run_rows, unload_patch
from .soft_tokens import SoftPrompt, invert_latents
from .soft_tokens import unsupported as soft_unsupported
from .stats import metric
from .text_attacks import catalogue_attacks

DEFAULT_BUDGET = {"prompts": 4, "soft_tokens": 4, "soft_steps": 30, "soft_lr": None, "inv_tokens": 2,
                  "inv_steps": 40, "inv_images": 8, "probe_images": 8, "strength": 0.6, "seed": 0}


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
                      seed: int = 0, template: str = "a photo of") -> SoftPrompt:
    """Learn K token embeddings that make the (patched) model denoise images of the concept:
    the plain diffusion loss ||eps_theta(x_t, "a photo of <v>") - eps||^2, as in textual inversion."""
    latents = for_pipe(pipe).encode_images(np.asarray(images))
    return invert_latents(pipe, latents, steps=steps, n_tokens=n_tokens, lr=lr, seed=seed, template=template)


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
    `world`: the concept world of the targets (patchforge.worlds; "default": the embedded default model's),
    None for catalogue concepts ("kind:name" specs)."""
    world = worlds.for_model(None) if world == "default" else world
    b = {**DEFAULT_BUDGET, **(budget or {})}
    seed_list = [SEED0 + s for s in range(seeds)]
    results = {}
    for concept in targets:
        if world is not None:
            prompts = world.attack_prompts(concept, b["prompts"])
        else:  # a "kind:name" spec; the judge is asked about the concept's name
            from .concepts import resolve
            spec = resolve(concept)
            prompts, concept = spec.target[:b["prompts"]], spec.name
        rep = [p for p in prompts for _ in seed_list]
        sds = seed_list * len(prompts)
        with patches_suspended(pipe):
            base_hit = np.array(judge.detect(generate(pipe, rep, sds), concept), float)

        def record(name, images, base, t0):
            hit = np.array(judge.detect(images, concept), float)
            r = results.setdefault(name, {"hits": [], "base": [], "images": images, "seconds": 0.0})
            r["hits"].append(hit)
            r["base"].append(base)
            r["seconds"] += time.perf_counter() - t0

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
                "unconditional": "concept rate in unconditional generations (empty prompt)",
                "partial": f"concept rate after partial denoising (strength {b['strength']}) of its images, "
                           "empty prompt"}[name]
        out[name] = {"metric": metric(np.concatenate(r["base"]), np.concatenate(r["hits"]), "lower", what),
                     "images": r["images"], "seconds": round(r["seconds"], 1)}
    return out


# ---------------------------------------------------------------- CLI
def attack_patch(path, model=None, budget=None, seeds: int = 2, which=None, judge=None, pipe=None) -> dict:
    """Load the patch, run the text and white-box attacks, return {attack: metric} (+ seconds)."""
    from .judging import default_judge
    from .pipeline_loading import load_pipeline

    asked = which
    which = tuple(which or ("text", "soft_prompt", "inversion", "unconditional", "partial"))
    world = worlds.for_model(model)
    judge = judge or default_judge(model)
    pipe = pipe or load_pipeline(model, device="cpu" if world else None)
    skipped = {}
    if not asked and soft_unsupported(pipe):  # by default, run what this family supports; asked for, it fails
        skipped = {a: soft_unsupported(pipe) for a in ("soft_prompt", "inversion")}
        which = tuple(a for a in which if a not in skipped)
    targets = patch_concepts(path, qualified=world is None)
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
                    from .concepts import resolve
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
        out.update({k: {**v["metric"], "seconds": v["seconds"]} for k, v in wb.items()})
    finally:
        unload_patch(pipe, name)
    return {"patch": str(path), "concepts": targets, "budget": {**DEFAULT_BUDGET, **(budget or {})}, "seeds": seeds,
            "attacks": out, "seconds": round(time.perf_counter() - t0, 1), **({"skipped": skipped} if skipped else {})}


def run_command(args) -> int:
    from .training import parse_set

    if not Path(args.patch).exists():
        raise PatchforgeError(f"no patch at {args.patch}")
    budget = parse_set(args.budget)
    unknown = set(budget) - set(DEFAULT_BUDGET)
    if unknown:
        raise PatchforgeError(f"unknown budget key(s) {', '.join(sorted(unknown))}: use {', '.join(DEFAULT_BUDGET)}")
    from .judging import load_judge

    res = attack_patch(args.patch, args.model, budget, args.seeds, args.attack or None,
                       load_judge(args.judge) if args.judge else None)
    out = Path(args.out) if args.out else Path(args.patch).with_suffix(".attack.json")
    write_text(out, json.dumps(res, indent=1, sort_keys=True) + "\n")
    print("| attack | base rate | ASR (patched) | 95% CI |\n|---|---|---|---|")
    for k, m in res["attacks"].items():
        ci = m["ci_patched"]
        print(f"| {k} | {m['base']:.0%} | {m['patched']:.0%} | [{ci[0]:.0%}, {ci[1]:.0%}] |")
    for k, why in res.get("skipped", {}).items():
        print(f"| {k} | skipped: {why} |||")
    print(f"wrote {out} ({res['seconds']} s)")
    return 0
