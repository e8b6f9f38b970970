"""`patchforge eval`: measure a forget patch against its base model, the way reviewers accept.

The base pipeline and the patched one generate the same prompts with the same seeds; a judge that
never took part in training says what each image shows. For every metric we report base, patched,
change and a paired bootstrap 95% interval (resampling prompt x seed units):

    efficacy       target concept's rate on its training prompts               (lower is better)
    generality     same on held-out aliases / paraphrases no method saw       (lower is better)
    specificity    neighbours of the same kind, concepts of other kinds, compositional prompts
                   (the other concept must survive), same-seed pixel distance on unrelated prompts.
                   Neighbours and other kinds are headlined on prompts the patch never trained on;
                   those among its training (preserve) prompts are reported apart (.in_sample)
    replacement    what the patched model draws where the target was asked for (patchforge.eval.drawn)
    unprompted     the target, or another concept of its kind, showing up where nobody asked for it
    utility        Fréchet distance to real toy images in the judge's features, projected on their
                   top 16 principal components (not FID: the judge's CNN, few samples, biased
                   upwards -- compare base vs patched only), and
                   prompt alignment (every attribute the prompt names is judged present)
    robustness     the concept's rate under text attacks (patchforge.eval.attacks); white-box attacks
                   join with --attacks
    cost           patch size, training time (patch metadata), load time, inference overhead

With `weights` (`--weights 0,0.5,1`), the target rates and the out-of-sample specificity again at
each adapter weight of the patch.

Output (written by report.py): <out>.eval.json (stable keys), <out>.eval.md (a table) and <out>.eval.png
(rows: prompts; columns: base | patched per seed). `--compare P1 P2 ...` puts several patches in one table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core import worlds
from ..core.concepts import merge, resolve
from ..core.output_paths import check_output_file
from ..core.pipeline_loading import load_pipeline, public_model_id
from ..errors import PatchforgeError, UnknownConcept
from ..io.loading import set_forget_patch_weight
from ..io.patch_format import K_BASE_ID, K_CONCEPTS, K_SECONDS, K_SEED, public_metadata, read_patch
from ..pipeline import sampling as generation
from ..pipeline.sampling import SEED0, encode_prompts, generate  # noqa: F401  (generate, encode_prompts: this module's API)
from . import drawn
from .attacks import run_attacks
from .judging import default_judge, load_judge
from .rows import Generated, Row, dedupe, load_patch, patch_concepts, patch_targets, run_rows, subset, unload_patch
from .report import WEIGHT_METRICS, fmt, public_command, report_stem, write_reports
from .text_attacks import catalogue_attacks
from .stats import N_BOOT, frechet_metric, metric

MAX_EVAL_WEIGHT = 4.0  # a weight response past 4x the trained strength measures a broken model, not the patch


# ---------------------------------------------------------------- prompt sets
def real_rows(targets: list[str], n: int = 6) -> list[Row]:
    """Real pipelines: the concept catalogue's prompts (patchforge.core.concepts) and text attacks."""
    rows = []
    for c in targets:
        spec = resolve(c)
        rows += [Row("efficacy", p, spec.name) for p in spec.target[:n]]
        rows += [Row("general", p, None) for p in spec.preserve[:2 * n]]
        for attack, prompts in catalogue_attacks(spec.name, spec.target, n=max(2, n // 2)).items():
            rows += [Row(f"attack:{attack}", p, spec.name) for p in prompts]
    return rows


# ---------------------------------------------------------------- evaluation
SETS = {  # metric key -> (row set, field, better, description)
    "efficacy": ("efficacy", "hit", "lower", "target concept rate, training prompts"),
    "generality": ("generality", "hit", "lower", "target concept rate, held-out aliases/paraphrases"),
    "specificity.neighbours": ("neighbour", "hit", "higher", "neighbouring concepts (same kind) kept"),
    "specificity.other_kinds": ("other_kind", "hit", "higher", "concepts of other kinds kept"),
    "specificity.compositional": ("efficacy", "kept", "higher", "other concept in target prompts kept"),
    "utility.alignment": ("general", "aligned", "higher", "general prompts: every named attribute shown"),
}
# Sets only some worlds' rows have (toy world v2): reported when the rows are there, so v1 reports keep their keys.
OPTIONAL_SETS = {
    "generality.implicit": ("implicit", "hit", "lower",
                            "implicit concept's rate on prompts that never name it (I2P-like)"),
    "specificity.second_subject": ("compositional", "kept", "higher",
                                   "second subject and its colour kept in target prompts that name one"),
}


SPLIT = {"specificity.neighbours": "neighbour", "specificity.other_kinds": "other_kind"}  # in/out of sample


def check_weights(weights) -> list[float]:
    """The weight response's adapter weights: numbers in [0, MAX_EVAL_WEIGHT], checked before any model loads."""
    out = []
    for w in weights or []:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or not \
                0 <= w <= MAX_EVAL_WEIGHT:
            raise PatchforgeError(f"eval weights must be numbers from 0 to {MAX_EVAL_WEIGHT:g}, got {w!r}")
        out.append(float(w))
    return list(dict.fromkeys(out))


def evaluate(patches: list[str | Path], model: str | None = None, seeds: int = 2, n: int = 6, judge=None,
             pipe=None, attacks: bool = False, attack_budget: dict | None = None, weights=None,
             progress=print) -> dict:
    """Evaluate each patch against the base model. Returns {"base": ..., "patches": [report, ...]}.
    Every report has stable keys (see module docstring); nothing here trains anything. `weights`: also
    measure the patch at each of these adapter weights (the weight response)."""
    weights = check_weights(weights)
    t_start = time.perf_counter()
    world = worlds.for_model(model)  # a concept world (the toy) brings its prompt sets; else the catalogue
    patches = [Path(p) for p in patches]
    targets_all = [patch_targets(p, world) for p in patches]  # checked before any load
    judge = judge or default_judge(model)
    if pipe is None:
        pipe = load_pipeline(model, device="cpu" if world else None)
    trained_all = [trained_prompts(p, world_name=world.name if world else None) for p in patches]
    # one base run covering every patch's prompt sets (shared rows are generated once); a world draws
    # fresh neighbour / other-kind prompts for those the patch trained on, so the headline has enough
    rows_per_patch = [world.eval_rows(t, n, avoid=tr) if world else real_rows(t, n)
                      for t, tr in zip(targets_all, trained_all)]
    all_rows, index = dedupe(rows_per_patch)
    progress(f"eval: base model, {len(all_rows) * seeds} images")
    base = run_rows(pipe, judge, all_rows, seeds)
    real = world.real_features(judge) if world and hasattr(judge, "features") else None
    reports = []
    for path, targets, rows, idx, trained in zip(patches, targets_all, rows_per_patch, index, trained_all):
        t0 = time.perf_counter()
        sub = subset(base, idx, seeds)
        in_sample = [trained is not None and r.prompt in trained for r in rows]
        name, load_s = load_patch(pipe, path)
        try:
            progress(f"eval: {path.name}, {len(rows) * seeds} images")
            patched = run_rows(pipe, judge, rows, seeds)
            white_box = {}
            if attacks:
                white_box = run_attacks(pipe, targets, judge, budget=attack_budget or {}, seeds=seeds, world=world)
            response = []
            for w in weights:  # weight 1 is the run above; every other weight is generated again
                set_forget_patch_weight(pipe, name, w)
                response.append(_weight_point(pipe, judge, rows, seeds, sub, patched, in_sample, w, progress))
        finally:
            unload_patch(pipe, name)
        patch = read_patch(path)
        rep = _report(judge, rows, seeds, sub, patched, real, white_box, in_sample, trained is not None)
        tos = _patch_tos(patch.metadata)
        if world is not None:
            rep["replacement_targets"] = drawn.neutrals(world, targets, tos)
            rep["metrics"].update(drawn.replacement(world, rows, seeds, sub, patched, rep["replacement_targets"]))
            if trained is not None and any(in_sample) and not all(in_sample):
                rep["metrics"].update(drawn.replacement(world, rows, seeds, sub, patched, rep["replacement_targets"],
                                                        only=[not s for s in in_sample], prefix="replacement_heldout"))
            rep["metrics"].update(drawn.side_effects(world, rows, seeds, sub, patched, targets,
                                                     rep["replacement_targets"]))
            rep["metrics"].update(drawn.unprompted(world, rows, seeds, sub, patched, targets))
        rep["overlap"] = _overlap(rows, in_sample, trained is not None)
        if weights:
            rep["weights"] = response
        if len(targets) > 1:
            rep["by_concept"] = _by_concept(rows, seeds, sub, patched)
            if world is not None:  # what replaces each one
                for c, m in rep["by_concept"].items():
                    m.update(drawn.replacement(world, rows, seeds, sub, patched, rep["replacement_targets"],
                                              only=[r.concept == c for r in rows]))
        rep["patch"] = {"path": str(path), "concepts": targets, "method": patch.method,
                        "bytes": path.stat().st_size,
                        "base_model": public_metadata(patch.metadata).get(K_BASE_ID)}
        rep["cost"] = {"patch_bytes": path.stat().st_size,
                       "training_seconds": _float(patch.metadata.get(K_SECONDS)),
                       "load_seconds": round(load_s, 3),
                       "inference_seconds_per_image_base": round(sub.seconds / max(1, len(sub.images)), 4),
                       "inference_seconds_per_image_patched": round(patched.seconds / max(1, len(patched.images)), 4),
                       "inference_overhead": round(patched.seconds / max(sub.seconds, 1e-9) - 1, 3)}
        rep["settings"] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "model": public_model_id(model),
                           "judge": judge.name, "seeds": seeds, "prompts_per_set": n,
                           "steps": generation.STEPS, "guidance": generation.GUIDANCE,
                           "image_seeds": [SEED0 + s for s in range(seeds)],
                           "bootstrap": N_BOOT}
        rep["images"] = {"rows": rows, "base": sub.images, "patched": patched.images, "in_sample": in_sample,
                         "attacked": {k: v.pop("images", None) for k, v in white_box.items()}}
        rep["seconds"] = round(time.perf_counter() - t0 + (base.seconds if len(patches) == 1 else 0), 1)
        reports.append(rep)
    return {"patches": reports, "seconds": round(time.perf_counter() - t_start, 1)}


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def trained_prompts(path, world_name: str | None = None) -> set[str] | None:
    """Every prompt the patch's method saw (targets, anchors, preserve), rebuilt from its metadata
    the way training built them; None when its concepts cannot be resolved here (custom files).
    `world_name`: the base model's concept world (its concepts' prompts: toy v1 and v2 share names)."""
    md = read_patch(path).metadata
    try:
        seed = int(md.get(K_SEED, 0))
        tos = {c["name"]: c.get("to") for c in json.loads(md.get(K_CONCEPTS) or "[]")}
        specs = [resolve(c, to=tos.get(c.split(":", 1)[-1]), seed=seed, world_name=world_name)
                 for c in patch_concepts(path, qualified=True)]
    except (UnknownConcept, ValueError):
        return None
    sets = merge(specs)
    return set(sets["target"]) | set(sets["anchor"]) | set(sets["preserve"]) | {c for c in sets["contrast"] if c}


def _patch_tos(md: dict) -> dict[str, str | None]:
    """concept name -> the replacement (`to`) its training recorded, if any."""
    try:
        return {c["name"]: c.get("to") for c in json.loads(md.get(K_CONCEPTS) or "[]")}
    except (ValueError, TypeError, KeyError):
        return {}


def _overlap(rows, in_sample: list[bool], known: bool) -> dict:
    """Per kept set: prompts (rows) in all, among the patch's training prompts, and outside them."""
    out = {}
    for s in SPLIT.values():
        flags = [f for r, f in zip(rows, in_sample) if r.set == s]
        out[s] = {"prompts": len(flags), "in_sample": sum(flags), "out_of_sample": len(flags) - sum(flags),
                  "training_prompts_known": known}
    return out


def _weight_point(pipe, judge, rows, seeds, base: Generated, patched: Generated, in_sample, weight, progress) -> dict:
    """The target rates and the out-of-sample specificity with the patch at `weight` (already set)."""
    keep = [i for i, r in enumerate(rows) if r.set in ("efficacy", "generality")
            or (r.set in SPLIT.values() and not in_sample[i])]
    sub_rows = [rows[i] for i in keep]
    if weight == 1.0:
        g = subset(patched, keep, seeds)
    else:
        progress(f"eval: weight {weight:g}, {len(sub_rows) * seeds} images")
        g = run_rows(pipe, judge, sub_rows, seeds)
    b = subset(base, keep, seeds)
    sets = np.array([r.set for r in sub_rows for _ in range(seeds)])
    out = {}
    for key in WEIGHT_METRICS:
        s, fld, better, what = SETS[key]
        m = sets == s
        out[key] = metric(b.scores[fld][m], g.scores[fld][m], better,
                          what + (", prompts not among the patch's training prompts" if key in SPLIT else ""))
    return {"weight": weight, "metrics": out}


def _by_concept(rows, seeds, base: Generated, patched: Generated) -> dict:
    """Efficacy, generality and compositional prompts kept for each concept a multi-concept patch erases (its
    own rows of the run): which concept's prompts lose the rest of their scene."""
    expanded = [r for r in rows for _ in range(seeds)]
    out = {}
    for c in dict.fromkeys(r.concept for r in rows if r.set == "efficacy"):
        out[c] = {}
        for key in ("efficacy", "generality", "specificity.compositional"):
            s, fld, better, what = SETS[key]
            m = np.array([r.set == s and r.concept == c for r in expanded])
            out[c][key] = metric(base.scores[fld][m], patched.scores[fld][m], better, what)
    return out


def _report(judge, rows, seeds, base: Generated, patched: Generated, real, white_box, in_sample, known) -> dict:
    expanded = [r for r in rows for _ in range(seeds)]
    sets = np.array([r.set for r in expanded])
    trained = np.array([f for f in in_sample for _ in range(seeds)], dtype=bool)
    metrics = {}
    for key, (s, fld, better, what) in SETS.items():
        m = sets == s
        if key in SPLIT:  # headline: prompts the patch never trained to hold; the rest reported apart
            metrics[key] = metric(base.scores[fld][m & ~trained], patched.scores[fld][m & ~trained], better,
                                  what + (", prompts not among the patch's training prompts" if known else
                                          ", all prompts (the patch's training prompts are unknown)"))
            metrics[f"{key}.in_sample"] = metric(base.scores[fld][m & trained], patched.scores[fld][m & trained],
                                                 better, what + ", prompts the patch trained on (its preserve set)")
            continue
        metrics[key] = metric(base.scores[fld][m], patched.scores[fld][m], better, what)
    for key, (s, fld, better, what) in OPTIONAL_SETS.items():
        m = sets == s
        if m.any():
            metrics[key] = metric(base.scores[fld][m], patched.scores[fld][m], better, what)
    # same-seed image distance on prompts that do not involve the target (other kinds + general)
    m = np.isin(sets, ["other_kind", "general"])
    dist = np.abs(base.images[m].astype(np.float64) - patched.images[m].astype(np.float64)).mean((1, 2, 3)) / 255
    metrics["specificity.image_distance"] = metric(np.zeros_like(dist), dist, "lower",
                                                    "same-seed mean abs pixel difference base vs patched, unrelated "
                                                    "prompts (0-1)")
    gen = sets == "general"
    if real is not None and gen.sum() > 2:
        metrics["utility.frechet"] = frechet_metric(judge.features(base.images[gen]),
                                                     judge.features(patched.images[gen]), real)
    for s in sorted({x for x in sets if x.startswith("attack:")}):
        m = sets == s
        metrics[f"robustness.{s.split(':', 1)[1]}"] = metric(base.scores["hit"][m], patched.scores["hit"][m], "lower",
                                                              f"target rate under text attack '{s.split(':', 1)[1]}'")
    for name, res in white_box.items():
        metrics[f"robustness.{name}"] = res["metric"]
    return {"metrics": metrics}


# ---------------------------------------------------------------- CLI
def run_command(args) -> int:


    patches = list(args.patch) + list(args.compare)
    if not patches:
        raise PatchforgeError("give a patch file (or --compare P1 P2 ...)")
    for p in patches:
        if not Path(p).exists():
            raise PatchforgeError(f"no patch at {p}")
    if args.seeds < 1 or args.prompts < 1:
        raise PatchforgeError("--seeds and --prompts must be at least 1")
    torch.manual_seed(0)
    judge = load_judge(args.judge) if args.judge else None
    weights = check_weights(getattr(args, "weights", None))  # before the model loads
    stems = [report_stem(p, args.out) for p in patches]
    for stem in stems:  # where the reports will go, before any work
        check_output_file(f"{stem}.eval.json", "--out" if args.out else "report")
    same = next((s for s in stems if stems.count(s) > 1), None)
    if same is not None:  # the second report would silently replace the first
        raise PatchforgeError(f"two patches would write the same report {same.name}.eval.json (the same file name"
                              f"{' in --out' if args.out else ''}): give each patch its own name")
    result = evaluate(patches, model=args.model, seeds=args.seeds, n=args.prompts, judge=judge, attacks=args.attacks,
                      weights=weights, progress=lambda m: print(m, file=sys.stderr))
    command = public_command(sys.argv[1:], args.model) if sys.argv[1:] else None
    for path in write_reports(result, args.out, command):
        print(f"wrote {path}")
    for rep in result["patches"]:
        m = rep["metrics"]
        print(f"{Path(rep['patch']['path']).name}: efficacy {fmt(m['efficacy']['base'], '')} -> "
              f"{fmt(m['efficacy']['patched'], '')}, generality {fmt(m['generality']['patched'], '')}, "
              f"other kinds kept {fmt(m['specificity.other_kinds']['patched'], '')} "
              f"(base {fmt(m['specificity.other_kinds']['base'], '')}); {result['seconds']} s")
    return 0
