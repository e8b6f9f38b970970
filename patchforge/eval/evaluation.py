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

Output: <out>.eval.json (stable keys), <out>.eval.md (a table) and <out>.eval.png (rows: prompts;
columns: base | patched per seed). `--compare P1 P2 ...` puts several patches in one table.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from ..core import worlds
from ..core.atomic import atomic_path, write_text
from ..core.output_paths import check_output_file
from ..core.pipeline_loading import load_pipeline, public_model_id
from ..io.patch_format import K_BASE_ID, K_SECONDS, public_metadata, read_patch
from ..errors import PatchforgeError
from ..core import generate as generation
from ..core.generate import SEED0, empty_embeds, generate  # noqa: F401  (generate, empty_embeds: this module's API)
from . import drawn
from .judging import default_judge
from .rows import Generated, Row, dedupe, load_patch, patch_concepts, patch_targets, run_rows, subset, unload_patch
from .text_attacks import catalogue_attacks
from .stats import N_BOOT, frechet_metric, metric

# 2: specificity.neighbours / .other_kinds are out-of-sample (were: all prompts; .out_of_sample is gone,
#    .in_sample is new); replacement.*, unprompted.*, "overlap", "replacement_targets", "weights" added
JSON_VERSION = 2
MAX_EVAL_WEIGHT = 4.0  # a weight response past 4x the trained strength measures a broken model, not the patch


# ---------------------------------------------------------------- prompt sets
def real_rows(targets: list[str], n: int = 6) -> list[Row]:
    """Real pipelines: the concept catalogue's prompts (patchforge.core.concepts) and text attacks."""
    from ..core.concepts import resolve

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
WEIGHT_METRICS = ("efficacy", "generality", "specificity.neighbours", "specificity.other_kinds")


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
    from ..io.loading import set_forget_patch_weight

    weights = check_weights(weights)
    t_start = time.perf_counter()
    world = worlds.for_model(model)  # a concept world (the toy) brings its prompt sets; else the catalogue
    patches = [Path(p) for p in patches]
    targets_all = [patch_targets(p, world) for p in patches]  # checked before any load
    judge = judge or default_judge(model)
    if pipe is None:
        pipe = load_pipeline(model, device="cpu" if world else None)
    trained_all = [trained_prompts(p, world=world.name if world else None) for p in patches]
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
                from .attacks import run_attacks
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
            rep["metrics"].update(drawn.unprompted(world, rows, seeds, sub, patched, targets))
        rep["overlap"] = _overlap(rows, in_sample, trained is not None)
        if weights:
            rep["weights"] = response
        if len(targets) > 1:
            rep["by_concept"] = _by_concept(rows, seeds, sub, patched)
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


def trained_prompts(path, world: str | None = None) -> set[str] | None:
    """Every prompt the patch's method saw (targets, anchors, preserve), rebuilt from its metadata
    the way training built them; None when its concepts cannot be resolved here (custom files).
    `world`: the base model's concept world (its concepts' prompts: toy v1 and v2 share names)."""
    from ..core.concepts import merge, resolve
    from ..errors import UnknownConcept
    from ..io.patch_format import K_CONCEPTS, K_SEED, read_patch

    md = read_patch(path).metadata
    try:
        seed = int(md.get(K_SEED, 0))
        tos = {c["name"]: c.get("to") for c in json.loads(md.get(K_CONCEPTS) or "[]")}
        specs = [resolve(c, to=tos.get(c.split(":", 1)[-1]), seed=seed, world=world)
                 for c in patch_concepts(path, qualified=True)]
    except (UnknownConcept, ValueError):
        return None
    sets = merge(specs)
    return set(sets["target"]) | set(sets["anchor"]) | set(sets["preserve"]) | {c for c in sets["contrast"] if c}


def _patch_tos(md: dict) -> dict[str, str | None]:
    """concept name -> the replacement (`to`) its training recorded, if any."""
    from ..io.patch_format import K_CONCEPTS

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
    """Efficacy and generality of each concept a multi-concept patch erases (its own rows of the run)."""
    expanded = [r for r in rows for _ in range(seeds)]
    out = {}
    for c in dict.fromkeys(r.concept for r in rows if r.set == "efficacy"):
        out[c] = {}
        for key in ("efficacy", "generality"):
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


# ---------------------------------------------------------------- reports
def to_json(rep: dict) -> dict:
    """The report without images, prompts kept: what <patch>.eval.json holds (sorted, stable keys)."""
    out = {k: v for k, v in rep.items() if k != "images"}
    out["patch"] = {**rep["patch"], "path": Path(rep["patch"]["path"]).name}  # no local folder leaves the machine
    out["version"] = JSON_VERSION
    out["prompts"] = [{"set": r.set, "prompt": r.prompt, "concept": r.concept, "trained": t}
                      for r, t in zip(rep["images"]["rows"], rep["images"]["in_sample"])]
    return out


def _fmt(x, key: str) -> str:
    if x is None:
        return "n/a"
    if key == "utility.frechet":
        return f"{x:.2f}"
    if key == "specificity.image_distance":
        return f"{x:.3f}"
    return f"{x:.0%}"


def _fmt_ci(ci, key: str) -> str:
    return "n/a" if ci is None else f"[{_fmt(ci[0], key)}, {_fmt(ci[1], key)}]"


def _change(m: dict, key: str) -> str:
    if m["change"] is None:
        return "n/a"
    if key in ("utility.frechet", "specificity.image_distance"):
        return f"{m['change']:+.3f}"
    return f"{m['change'] * 100:+.0f} pt"


def markdown(reports: list[dict], command: str | None = None) -> str:
    """One table; for several patches, one column pair (patched, change) per patch."""
    first = reports[0]
    lines = []
    if len(reports) == 1:
        p = first["patch"]
        lines += [f"# Evaluation of `{Path(p['path']).name}`", "",
                  f"Erases **{', '.join(p['concepts'])}** (method `{p['method']}`) on `{first['settings']['model']}`; "
                  f"judge `{first['settings']['judge']}`; {first['settings']['seeds']} seeds per prompt "
                  f"(image seeds {first['settings']['image_seeds']}), {first['settings']['steps']} steps, guidance "
                  f"{first['settings']['guidance']}; paired bootstrap 95% intervals over prompt x seed units.", "",
                  "| metric | base | patched | change | 95% CI of change | n | better | what |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_row(key, m) for key, m in first["metrics"].items() if not _in_section(key)]
        lines += _sections(first)
    else:
        names = [Path(r["patch"]["path"]).name for r in reports]
        lines += ["# Evaluation: " + ", ".join(f"`{n}`" for n in names), "",
                  "| metric | base | " + " | ".join(f"{n} (change, 95% CI)" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        keys = list(dict.fromkeys(k for r in reports for k in r["metrics"]))
        for key in keys:
            ms = [r["metrics"].get(key) for r in reports]
            base = next((m["base"] for m in ms if m), None)
            cells = [f"{_fmt(m['patched'], key)} ({_change(m, key)}, "
                     f"{_ci_raw(m) if key in RAW_CI else _fmt_ci(m['ci_change'], key)})"
                     if m else "n/a" for m in ms]
            lines.append(f"| {key} | {_fmt(base, key)} | " + " | ".join(cells) + " |")
    lines += ["", "| cost | " + " | ".join(Path(r["patch"]["path"]).name for r in reports) + " |",
              "|---|" + "---|" * len(reports)]
    for key in first["cost"]:
        lines.append(f"| {key} | " + " | ".join(str(r["cost"][key]) for r in reports) + " |")
    lines += ["", "Efficacy, generality and robustness are rates of the target concept (lower = erased). "
              "The Fréchet distance is computed in the toy judge's CNN feature space on few images: biased upwards, "
              "meaningful only as base vs patched, not comparable with published FID."]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


RAW_CI = ("utility.frechet", "specificity.image_distance")  # intervals shown as numbers, not percentages


def _row(key: str, m: dict, label: str | None = None) -> str:
    ci = _ci_raw(m) if key in RAW_CI else _fmt_ci(m["ci_change"], key)
    return (f"| {label or key} | {_fmt(m['base'], key)} | {_fmt(m['patched'], key)} | {_change(m, key)} | {ci} | "
            f"{m['n']} | {m['better']} | {m['what']} |")


def _in_section(key: str) -> bool:
    """Metrics shown in their own section of a single patch's report, not in its main table."""
    return key.startswith(("replacement.", "unprompted.")) or key.endswith(".in_sample")


def _neutral_words(concept: str, t: dict) -> str:
    source = f"the patch's `to` {t['to']!r}" if t["from"] == "to" else "the world's neutral"
    label = t["label"] or "nothing the judge can name (no neutral counted)"
    return f"{concept} -> {label} ({source}), neighbours {', '.join(t['neighbours']) or 'none'}"


def _sections(rep: dict) -> list[str]:
    """A single patch's report after its main table: what is drawn instead, unprompted appearance,
    specificity in and out of sample, the weight response."""
    metrics, head = rep["metrics"], ["| metric | base | patched | change | 95% CI of change | n | better | what |",
                                     "|---|---|---|---|---|---|---|---|"]
    lines = []
    if any(k.startswith("replacement.") for k in metrics):
        said = "; ".join(_neutral_words(c, t) for c, t in rep.get("replacement_targets", {}).items())
        lines += ["", "## What is drawn instead", "",
                  "On the target's own prompts (efficacy + generality rows): the share of images whose "
                  f"concept of the target's kind is the target (kept), its neutral replacement, a protected "
                  f"neighbour, another concept of the kind, or none the judge can name (absent). Neutral: {said}.",
                  "", *head]
        lines += [_row(k, m) for k, m in metrics.items() if k.startswith("replacement.")]
    if any(k.startswith("unprompted.") for k in metrics):
        lines += ["", "## Unprompted appearance", "",
                  "On prompts that never ask for the target (general, neighbour and other-kind rows): the target "
                  "shown anyway, and another concept of its kind shown that the prompt did not ask for (counted "
                  "on prompts that fix that kind: they name it, or ask for a character where no shape, colour "
                  "or style belongs, or for a shape where no character does).",
                  "", *head]
        lines += [_row(k, m) for k, m in metrics.items() if k.startswith("unprompted.")]
    ov = rep.get("overlap", {})
    if any(k.endswith(".in_sample") for k in metrics):
        known = all(o["training_prompts_known"] for o in ov.values())
        counts = "; ".join(f"{s}: {o['prompts']} prompts, {o['in_sample']} among the patch's training prompts"
                           for s, o in ov.items())
        lines += ["", "## Specificity in and out of sample", "",
                  (f"The neighbour and other-kind rows of the main table use only prompts the patch never trained "
                   f"on (out of sample). Prompts of those sets that are among its training (preserve) prompts "
                   f"are measured apart here ({counts})." if known else
                   "The patch's training prompts could not be rebuilt from its metadata: the main table's "
                   "neighbour and other-kind rows use all prompts, and nothing is in sample."), "", *head]
        lines += [_row(k, m) for k, m in metrics.items() if k.endswith(".in_sample")]
    if rep.get("weights"):
        lines += ["", "## Weight response", "",
                  "The patch loaded at each adapter weight, against the base on the same prompts and seeds; "
                  "patched rate (change, 95% CI of change). Specificity on out-of-sample prompts.", "",
                  "| weight | " + " | ".join(WEIGHT_METRICS) + " |", "|---|" + "---|" * len(WEIGHT_METRICS)]
        for point in rep["weights"]:
            cells = [f"{_fmt(m['patched'], k)} ({_change(m, k)}, {_fmt_ci(m['ci_change'], k)})"
                     for k, m in point["metrics"].items()]
            lines.append(f"| {point['weight']:g} | " + " | ".join(cells) + " |")
    return lines


def _ci_raw(m: dict) -> str:
    return "n/a" if m["ci_change"] is None else f"[{m['ci_change'][0]:+.3f}, {m['ci_change'][1]:+.3f}]"


def grid(rep: dict, path, per_set: int = 1) -> None:
    """Before/after picture: rows are prompts (the first of each set, then white-box attacks),
    columns base | patched for each seed. Attacked rows show the attacked patched model only."""
    from PIL import Image, ImageDraw

    rows, seeds = rep["images"]["rows"], rep["settings"]["seeds"]
    base, patched = rep["images"]["base"], rep["images"]["patched"]
    picks, seen = [], {}
    for i, r in enumerate(rows):
        if seen.get(r.set, 0) < per_set:
            seen[r.set] = seen.get(r.set, 0) + 1
            picks.append((f"{r.set}: {r.prompt}", base[i * seeds:(i + 1) * seeds], patched[i * seeds:(i + 1) * seeds]))
    for name, imgs in (rep["images"].get("attacked") or {}).items():
        if imgs is not None and len(imgs):
            picks.append((f"white-box {name} (patched only)", None, imgs[:seeds]))
    cell, label_w, head = 64, 330, 18
    canvas = Image.new("RGB", (label_w + 2 * seeds * cell, head + len(picks) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for s in range(seeds):
        draw.text((label_w + 2 * s * cell + 4, 3), f"base s{s}", fill=(0, 0, 0))
        draw.text((label_w + (2 * s + 1) * cell + 4, 3), f"patched s{s}", fill=(0, 0, 0))
    for j, (label, b, p) in enumerate(picks):
        y = head + j * cell
        for line_no, line in enumerate([label[i:i + 50] for i in range(0, min(len(label), 150), 50)]):
            draw.text((4, y + 14 + 12 * line_no), line, fill=(0, 0, 0))
        for s in range(seeds):
            for k, imgs in enumerate((b, p)):
                if imgs is not None and s < len(imgs):
                    tile = Image.fromarray(imgs[s]).resize((cell, cell), Image.NEAREST)
                    canvas.paste(tile, (label_w + (2 * s + k) * cell, y))
    with atomic_path(path) as tmp:
        canvas.save(tmp)


def public_command(argv: list[str], model: str | None) -> str:
    """The command line as a report may show it: the model by its public id, every file or folder by its
    name alone (a path names the user's folders)."""
    shown = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] == "--model":
            a = public_model_id(model)
        elif a.startswith("--model="):
            a = "--model=" + public_model_id(model)
        elif not a.startswith("-") and ("/" in a or "\\" in a) and Path(a).expanduser().exists():
            a = Path(a).name
        shown.append(shlex.quote(a))
    return "patchforge " + " ".join(shown)


def report_stem(patch_path, out=None) -> Path:
    """Reports go beside the patch, or into the folder `out`: <stem>.eval.json / .md / .png."""
    return (Path(out) / Path(patch_path).name if out else Path(patch_path)).with_suffix("")


def write_reports(result: dict, out: str | Path | None = None, command: str | None = None) -> list[Path]:
    """<patch>.eval.{json,md,png} beside each patch (or in `out`); with several patches also a
    comparison table compare.eval.md."""
    written = []
    for rep in result["patches"]:
        stem = report_stem(rep["patch"]["path"], out)
        js = Path(f"{stem}.eval.json")
        write_text(js, json.dumps(to_json(rep), indent=1, sort_keys=True, default=float) + "\n")
        md = Path(f"{stem}.eval.md")
        write_text(md, markdown([rep], command) + f"\n![before/after]({stem.name}.eval.png)\n")
        png = Path(f"{stem}.eval.png")
        grid(rep, png)
        written += [js, md, png]
    if len(result["patches"]) > 1:
        where = Path(out) if out else Path(result["patches"][0]["patch"]["path"]).parent
        cmp = where / "compare.eval.md"
        write_text(cmp, markdown(result["patches"], command))
        written.append(cmp)
    return written


# ---------------------------------------------------------------- CLI
def run_command(args) -> int:
    import sys

    from .judging import load_judge

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
    for p in patches:  # where the reports will go, before any work
        check_output_file(f"{report_stem(p, args.out)}.eval.json", "--out" if args.out else "report")
    result = evaluate(patches, model=args.model, seeds=args.seeds, n=args.prompts, judge=judge, attacks=args.attacks,
                      weights=weights, progress=lambda m: print(m, file=sys.stderr))
    command = public_command(sys.argv[1:], args.model) if sys.argv[1:] else None
    for path in write_reports(result, args.out, command):
        print(f"wrote {path}")
    for rep in result["patches"]:
        m = rep["metrics"]
        print(f"{Path(rep['patch']['path']).name}: efficacy {_fmt(m['efficacy']['base'], '')} -> "
              f"{_fmt(m['efficacy']['patched'], '')}, generality {_fmt(m['generality']['patched'], '')}, "
              f"other kinds kept {_fmt(m['specificity.other_kinds']['patched'], '')} "
              f"(base {_fmt(m['specificity.other_kinds']['base'], '')}); {result['seconds']} s")
    return 0
