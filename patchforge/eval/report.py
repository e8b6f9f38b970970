"""`patchforge eval`'s reports: <stem>.eval.json (stable keys), <stem>.eval.md (tables) and
<stem>.eval.png (base | patched per seed), and a comparison table for several patches. Nothing here
generates or judges an image: evaluation.py makes the report dict this module writes."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..core.atomic import atomic_path, write_text
from ..core.pipeline_loading import public_model_id

# 2: specificity.neighbours / .other_kinds are out-of-sample (were: all prompts; .out_of_sample is gone,
#    .in_sample is new); replacement.*, unprompted.*, "overlap", "replacement_targets", "weights" added
JSON_VERSION = 2
WEIGHT_METRICS = ("efficacy", "generality", "specificity.neighbours", "specificity.other_kinds")


def to_json(rep: dict) -> dict:
    """The report without images, prompts kept: what <patch>.eval.json holds (sorted, stable keys)."""
    out = {k: v for k, v in rep.items() if k != "images"}
    out["patch"] = {**rep["patch"], "path": Path(rep["patch"]["path"]).name}  # no local folder leaves the machine
    out["version"] = JSON_VERSION
    out["prompts"] = [{"set": r.set, "prompt": r.prompt, "concept": r.concept, "trained": t}
                      for r, t in zip(rep["images"]["rows"], rep["images"]["in_sample"])]
    return out


def fmt(x, key: str) -> str:
    if x is None:
        return "n/a"
    if key == "utility.frechet":
        return f"{x:.2f}"
    if key == "specificity.image_distance":
        return f"{x:.3f}"
    return f"{x:.0%}"


def _fmt_ci(ci, key: str) -> str:
    return "n/a" if ci is None else f"[{fmt(ci[0], key)}, {fmt(ci[1], key)}]"


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
            cells = [f"{fmt(m['patched'], key)} ({_change(m, key)}, "
                     f"{_ci_raw(m) if key in RAW_CI else _fmt_ci(m['ci_change'], key)})"
                     if m else "n/a" for m in ms]
            lines.append(f"| {key} | {fmt(base, key)} | " + " | ".join(cells) + " |")
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
    return (f"| {label or key} | {fmt(m['base'], key)} | {fmt(m['patched'], key)} | {_change(m, key)} | {ci} | "
            f"{m['n']} | {m['better']} | {m['what']} |")


def _in_section(key: str) -> bool:
    """Metrics shown in their own section of a single patch's report, not in its main table."""
    return key.startswith(("replacement.", "replacement_heldout.", "unprompted.", "side_effect.")) \
        or key.endswith(".in_sample")


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
        held = [_row(k, m) for k, m in metrics.items() if k.startswith("replacement_heldout.")]
        if held:
            lines += ["", "The same on the target prompts the patch never trained on (held out):", "", *head, *held]
    if rep.get("by_concept"):
        lines += _per_concept(rep["by_concept"])
    side = [_row(k, m) for k, m in metrics.items() if k.startswith("side_effect.")]
    if any(k.startswith("replacement.") for k in metrics):  # the judge names what it sees: side effects counted
        lines += ["", "## Side effects", "",
                  "On the target's own prompts: every other concept, of any kind, that the patched model draws "
                  "more often than the base where the prompt did not ask for it (the neutral replacement excepted)"
                  + (":" if side else ". None: no concept is drawn more often than at base."), ""]
        lines += [*head, *side] if side else []
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
            cells = [f"{fmt(m['patched'], k)} ({_change(m, k)}, {_fmt_ci(m['ci_change'], k)})"
                     for k, m in point["metrics"].items()]
            lines.append(f"| {point['weight']:g} | " + " | ".join(cells) + " |")
    return lines


def _per_concept(by_concept: dict) -> list[str]:
    """A multi-concept patch: each concept's own target rates and what replaces it (patched, base in brackets)."""
    cats = [c for c in ("neutral", "neighbour", "other", "absent") if any(f"replacement.{c}" in m
                                                                          for m in by_concept.values())]
    lines = ["", "## Per concept", "",
             "Each listed concept on its own prompts: the target rate on training prompts (efficacy) and held-out "
             "ones (generality), the other concepts its training prompts name kept (compositional), patched (base), "
             "and what its images show instead.", "",
             "| concept | efficacy | generality | compositional | " + " | ".join(cats) + " |",
             "|---|---|---|---|" + "---|" * len(cats)]
    for c, m in by_concept.items():
        cells = [f"{fmt(m[k]['patched'], k)} ({fmt(m[k]['base'], k)})" if m.get(k, {}).get("n") else "n/a"
                 for k in ("efficacy", "generality", "specificity.compositional")]
        cells += [fmt(m[f"replacement.{x}"]["patched"], "replacement") if f"replacement.{x}" in m else "n/a"
                  for x in cats]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
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
