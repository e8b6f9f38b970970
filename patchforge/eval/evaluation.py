"""`patchforge eval`: measure a forget patch against its base model, the way reviewers accept.

The base pipeline and the patched one generate the same prompts with the same seeds; a judge that
never took part in training says what each image shows. For every metric we report base, patched,
change and a paired bootstrap 95% interval (resampling prompt x seed units):

    efficacy       target concept's rate on its training prompts               (lower is better)
    generality     same on held-out aliases / paraphrases no method saw       (lower is better)
    specificity    neighbours of the same kind, concepts of other kinds, compositional prompts
                   (the other concept must survive), same-seed pixel distance on unrelated prompts
    utility        Fréchet distance to real toy images in the judge's features, projected on their
                   top 16 principal components (not FID: the judge's CNN, few samples, biased
                   upwards -- compare base vs patched only), and
                   prompt alignment (every attribute the prompt names is judged present)
    robustness     the concept's rate under text attacks (patchforge.eval.attacks); white-box attacks
                   join with --attacks
    cost           patch size, training time (patch metadata), load time, inference overhead

Output: <out>.eval.json (stable keys), <out>.eval.md (a table) and <out>.eval.png (rows: prompts;
columns: base | patched per seed). `--compare P1 P2 ...` puts several patches in one table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..core import worlds
from ..core.atomic import atomic_path, write_text
from ..errors import PatchforgeError
from ..core import generate as generation
from ..core.generate import SEED0, empty_embeds, generate  # noqa: F401  (generate, empty_embeds: this module's API)
from .judging import default_judge
from .rows import Generated, Row, dedupe, load_patch, patch_concepts, run_rows, subset, unload_patch
from .text_attacks import catalogue_attacks
from .stats import N_BOOT, frechet_metric, metric

JSON_VERSION = 1


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


def evaluate(patches: list[str | Path], model: str | None = None, seeds: int = 2, n: int = 6, judge=None,
             pipe=None, attacks: bool = False, attack_budget: dict | None = None, progress=print) -> dict:
    """Evaluate each patch against the base model. Returns {"base": ..., "patches": [report, ...]}.
    Every report has stable keys (see module docstring); nothing here trains anything."""
    from ..core.pipeline_loading import load_pipeline, model_id
    from ..io.patch_format import K_BASE_ID, K_SECONDS, read_patch

    t_start = time.perf_counter()
    world = worlds.for_model(model)  # a concept world (the toy) brings its prompt sets; else the catalogue
    judge = judge or default_judge(model)
    if pipe is None:
        pipe = load_pipeline(model, device="cpu" if world else None)
    patches = [Path(p) for p in patches]
    targets_all = [patch_concepts(p, qualified=world is None) for p in patches]
    # one base run covering every patch's prompt sets (shared rows are generated once)
    rows_per_patch = [world.eval_rows(t, n) if world else real_rows(t, n) for t in targets_all]
    all_rows, index = dedupe(rows_per_patch)
    progress(f"eval: base model, {len(all_rows) * seeds} images")
    base = run_rows(pipe, judge, all_rows, seeds)
    real = world.real_features(judge) if world and hasattr(judge, "features") else None
    reports = []
    for path, targets, rows, idx in zip(patches, targets_all, rows_per_patch, index):
        t0 = time.perf_counter()
        name, load_s = load_patch(pipe, path)
        try:
            progress(f"eval: {path.name}, {len(rows) * seeds} images")
            patched = run_rows(pipe, judge, rows, seeds)
            white_box = {}
            if attacks:
                from .attacks import run_attacks
                white_box = run_attacks(pipe, targets, judge, budget=attack_budget or {}, seeds=seeds, world=world)
        finally:
            unload_patch(pipe, name)
        sub = subset(base, idx, seeds)
        patch = read_patch(path)
        rep = _report(judge, rows, seeds, sub, patched, real, white_box)
        rep["metrics"].update(_out_of_sample(rows, seeds, sub, patched,
                                             trained_prompts(path, world=world.name if world else None)))
        if len(targets) > 1:
            rep["by_concept"] = _by_concept(rows, seeds, sub, patched)
        rep["patch"] = {"path": str(path), "concepts": targets, "method": patch.method,
                        "bytes": path.stat().st_size, "base_model": patch.metadata.get(K_BASE_ID)}
        rep["cost"] = {"patch_bytes": path.stat().st_size,
                       "training_seconds": _float(patch.metadata.get(K_SECONDS)),
                       "load_seconds": round(load_s, 3),
                       "inference_seconds_per_image_base": round(sub.seconds / max(1, len(sub.images)), 4),
                       "inference_seconds_per_image_patched": round(patched.seconds / max(1, len(patched.images)), 4),
                       "inference_overhead": round(patched.seconds / max(sub.seconds, 1e-9) - 1, 3)}
        rep["settings"] = {"model": model_id(model), "judge": judge.name, "seeds": seeds, "prompts_per_set": n,
                           "steps": generation.STEPS, "guidance": generation.GUIDANCE,
                           "image_seeds": [SEED0 + s for s in range(seeds)],
                           "bootstrap": N_BOOT}
        rep["images"] = {"rows": rows, "base": sub.images, "patched": patched.images,
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


def _out_of_sample(rows, seeds, base: Generated, patched: Generated, trained: set[str] | None) -> dict:
    """Neighbour and other-kind retention on the prompts the method never trained to hold (the
    plain specificity metrics include prompts that are also in its preserve set)."""
    if trained is None:
        return {}
    expanded = [r for r in rows for _ in range(seeds)]
    out = {}
    for key, what in (("neighbour", "specificity.neighbours"), ("other_kind", "specificity.other_kinds")):
        m = np.array([r.set == key and r.prompt not in trained for r in expanded])
        out[f"{what}.out_of_sample"] = metric(base.scores["hit"][m], patched.scores["hit"][m], "higher",
                                              SETS[what][3] + ", prompts not among those the patch trained on")
    return out


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


def _report(judge, rows, seeds, base: Generated, patched: Generated, real, white_box) -> dict:
    expanded = [r for r in rows for _ in range(seeds)]
    sets = np.array([r.set for r in expanded])
    metrics = {}
    for key, (s, fld, better, what) in SETS.items():
        m = sets == s
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
    out["version"] = JSON_VERSION
    out["prompts"] = [{"set": r.set, "prompt": r.prompt, "concept": r.concept} for r in rep["images"]["rows"]]
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
        for key, m in first["metrics"].items():
            ci = _ci_raw(m) if key in RAW_CI else _fmt_ci(m["ci_change"], key)
            lines.append(f"| {key} | {_fmt(m['base'], key)} | {_fmt(m['patched'], key)} | {_change(m, key)} | "
                         f"{ci} | {m['n']} | {m['better']} | {m['what']} |")
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


def write_reports(result: dict, out: str | Path | None = None, command: str | None = None) -> list[Path]:
    """<patch>.eval.{json,md,png} beside each patch (or in `out`); with several patches also a
    comparison table compare.eval.md."""
    written = []
    for rep in result["patches"]:
        src = Path(rep["patch"]["path"])
        stem = (Path(out) / src.name if out else src).with_suffix("")
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
    import shlex
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
    result = evaluate(patches, model=args.model, seeds=args.seeds, n=args.prompts, judge=judge, attacks=args.attacks,
                      progress=lambda m: print(m, file=sys.stderr))
    command = "patchforge " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    for path in write_reports(result, args.out, command):
        print(f"wrote {path}")
    for rep in result["patches"]:
        m = rep["metrics"]
        print(f"{Path(rep['patch']['path']).name}: efficacy {_fmt(m['efficacy']['base'], '')} -> "
              f"{_fmt(m['efficacy']['patched'], '')}, generality {_fmt(m['generality']['patched'], '')}, "
              f"other kinds kept {_fmt(m['specificity.other_kinds']['patched'], '')} "
              f"(base {_fmt(m['specificity.other_kinds']['base'], '')}); {result['seconds']} s")
    return 0
