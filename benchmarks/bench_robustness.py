"""Robustness benchmark behind docs/robustness.md: for one style, one object and one identity concept,
train fmn patches, attack them with fixed seeds and budgets, and measure what the patch keeps (eval's
specificity). Writes a Markdown table and a JSON file.

Patch variants (--variants):
    default     fmn at its defaults, trained here (hardened warm start, 2026-12-07)
    fast        fmn --fast: the previous default (no hardening)
    robust      fmn --robust (AdvUnlearn-style inner soft-prompt loop)
    undefended  fmn as published: attention re-steering with the preservation, away and keep terms off, cold
                (--steps 80 --set preserve_weight=0 --set away=0 --set keep_weight=0 --set warm_start=
                --set teacher_pool=0): the suite's validity check,
                every strong attack should bring its concept back
    shipped     the shipped default patch (patches/<kind>-<name>.fmn.safetensors), not retrained
    esd         ESD tuned for the toy (ESD_TOY: eta 3; no preservation term, the field's baseline): for the
                leaderboard's ordering of fmn-as-published, esd and adversarial training (robust)
    uce         uce at its defaults: the closed form alone, no hardening (what fmn's warm start starts from)

    .venv/bin/python benchmarks/bench_robustness.py [--model M] [--concepts style:stripes object:star identity:kiko]
        [--variants default robust] [--attacks ...] [--prompts 4] [--seeds 2] [--budget KEY=VALUE]
        [--skip-eval] [--reuse] [--steps N] [--set KEY=VALUE] [--esd-set KEY=VALUE] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchforge.cli import key_value  # noqa: E402
from patchforge.eval.attacks import attack_patch  # noqa: E402
from patchforge.eval.evaluation import default_judge, evaluate  # noqa: E402
from patchforge.core.pipeline_loading import load_pipeline  # noqa: E402
from patchforge.train.robust import wrap_trainer  # noqa: E402
from patchforge.train.loop import TrainConfig, train_patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {"prompts": 4, "soft_tokens": 4, "soft_steps": 30, "inv_tokens": 2, "inv_steps": 40, "inv_images": 8,
          "probe_images": 8, "strength": 0.6, "seed": 0}  # the published attacks run at DEFAULT_BUDGET's values
ATTACKS = ["misspelling", "paraphrase", "described", "padding", "soft_prompt", "inversion", "inversion_converged",
           "unlearndiff", "unlearndiff_strong", "ring_a_bell", "unconditional", "partial"]
TEXT = {"misspelling", "paraphrase", "described", "padding"}
# fmn's FMNConfig fields: FMN as published starts cold, with fresh teachers, for 80 steps (UNDEFENDED_STEPS)
UNDEFENDED = {"preserve_weight": 0, "away": 0, "keep_weight": 0, "warm_start": "", "teacher_pool": 0}
UNDEFENDED_STEPS = 80
# esd at its published defaults (80 steps, lr 2e-3, eta 1) leaves the toy star in 62 % of images, so the
# table's esd row is esd tuned for the toy (docs/robustness.md, "The benchmark"); --esd-set overrides it
ESD_TOY = {"eta": 3.0}  # erases the star and stripes (0 % left; other kinds 56 % of base)
FAMILY_ATTACKS = ["unlearndiff", "unlearndiff_strong", "ring_a_bell", "inversion_converged"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--concepts", nargs="+", default=["style:stripes", "object:star", "identity:kiko"])
    ap.add_argument("--variants", nargs="+", default=["default", "robust"],
                    choices=["default", "fast", "robust", "undefended", "shipped", "esd", "uce"])
    ap.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    ap.add_argument("--inner-steps", type=int, default=3,
                    help="robust's inner attack steps (--set robust_inner_steps=N wins)")
    ap.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE", dest="options",
                    help="option for the fmn variants (default, fast, robust), as `patchforge train --set`")
    ap.add_argument("--uce-set", action="append", type=key_value, default=[], metavar="KEY=VALUE", dest="uce_options",
                    help="option for the uce variant (default: its defaults)")
    ap.add_argument("--esd-set", action="append", type=key_value, default=[], metavar="KEY=VALUE", dest="esd_options",
                    help=f"option for the esd variant (default: {ESD_TOY}, its tuning for the toy model)")
    ap.add_argument("--prompts", type=int, default=BUDGET["prompts"], help="target prompts attacked per concept")
    ap.add_argument("--seeds", type=int, default=2, help="image seeds per prompt (cells: prompts x seeds images)")
    ap.add_argument("--budget", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                    help="attack budget override, as `patchforge attack --budget`")
    ap.add_argument("--skip-eval", action="store_true", help="attacks only, no specificity eval")
    ap.add_argument("--reuse", action="store_true", help="attack patches already in --patch-dir instead of retraining")
    ap.add_argument("--out", default="benchmarks/robustness.json")
    ap.add_argument("--patch-dir", default="benchmarks/robustness_patches")
    args = ap.parse_args()
    budget = {**BUDGET, "prompts": args.prompts, **dict(args.budget)}
    which = sorted({"text" if a in TEXT else a for a in args.attacks})
    pipe, judge = load_pipeline(args.model, device="cpu"), default_judge(args.model)
    # Rows for (concept, variant) pairs not rerun now are kept, so one can be re-measured without redoing all.
    out_path = Path(args.out)
    # With --reuse the patch is the one already measured, so its row gains the attacks run now.
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    for concept in args.concepts:
        for tag in args.variants:
            path, train_s = patch_for(concept, tag, args, pipe)
            before = next((r for r in rows if r["concept"] == concept and r["patch"] == tag), None)
            rows = [r for r in rows if r is not before]
            att = attack_patch(path, args.model, budget, args.seeds, which=which, judge=judge, pipe=pipe)
            keep = None
            if not args.skip_eval:
                ev = evaluate([path], args.model, seeds=args.seeds, n=4, judge=judge, pipe=pipe,
                              progress=lambda m: None)["patches"][0]["metrics"]
                keep = {k: ev[k] for k in ("efficacy", "generality", "specificity.neighbours",
                                           "specificity.other_kinds", "specificity.compositional") if k in ev}
            got = {k: v for k, v in att["attacks"].items() if k in ATTACKS}
            rows.append({"concept": concept, "patch": tag, "train_seconds": train_s,
                         "asr": {k: v["patched"] for k, v in got.items()},
                         "base": {k: v["base"] for k, v in got.items()},
                         "ci": {k: v["ci_patched"] for k, v in got.items()},
                         "n": {k: v["n"] for k, v in got.items()},
                         "seconds": {k: v.get("seconds") for k, v in got.items()},
                         "steps": {k: v["steps"] for k, v in got.items() if "steps" in v},
                         "eval": keep, "attack_seconds": att["seconds"]})
            if before is not None and train_s is None:  # reused: the earlier attacks and eval still hold
                row = rows[-1]
                for key in ("asr", "base", "ci", "n", "seconds", "steps"):
                    row[key] = {**before.get(key, {}), **row[key]}
                row["train_seconds"] = before.get("train_seconds")
                row["eval"] = row["eval"] or before.get("eval")
            print(json.dumps(rows[-1]["asr"]), concept, tag, f"train {train_s}s", flush=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"budget": att["budget"], "seeds": args.seeds, "rows": rows}, indent=1))
            tmp.replace(out_path)
    print(family_table(rows))
    print()
    print(table(rows))
    print()
    print(ci_table(rows))


def patch_for(concept: str, tag: str, args, pipe) -> tuple[Path, float | None]:
    """The patch of this variant (trained now unless shipped or --reuse) and its training seconds."""
    if tag == "shipped":
        return ROOT / "patches" / f"{concept.replace(':', '-')}.fmn.safetensors", None
    method = tag if tag in ("esd", "uce") else "fmn"
    name = f"{method}.{tag}" if tag != method else method
    out = Path(args.patch_dir) / f"{concept.replace(':', '-')}.{name}.safetensors"
    if args.reuse and out.exists():
        return out, None
    steps = args.steps or (UNDEFENDED_STEPS if tag == "undefended" else None)
    fixed = {"undefended": UNDEFENDED, "esd": {**ESD_TOY, **dict(args.esd_options)}, "uce": dict(args.uce_options)}
    options = dict(fixed.get(tag, args.options))
    if tag == "robust":  # the inner attack reads its robust_* options, as `patchforge train --robust --set` gives them
        options.setdefault("robust_inner_steps", args.inner_steps)
    lr = options.pop("lr", None) if tag == "esd" else None
    cfg = TrainConfig(method=method, steps=steps, lr=lr, progress=False, fast=tag == "fast", options=options)
    hook = wrap_trainer if tag == "robust" else None
    t0 = time.time()
    path, _ = train_patch([concept], method, args.model, cfg, out=out, pipe=pipe, robust=hook)
    return path, round(time.time() - t0, 1)


def table(rows) -> str:
    """ASR per attack, and what the patch keeps (eval), one row per patch."""
    head = ("| concept | patch | train s | " + " | ".join(ATTACKS)
            + " | neighbours kept (base) | other kinds kept (base) |")
    lines = [head, "|" + "---|" * (len(ATTACKS) + 5)]
    for r in rows:
        cells = [f"{r['asr'][a]:.0%}" if r["asr"].get(a) is not None else "n/a" for a in ATTACKS]
        keep = ["n/a", "n/a"]
        if r.get("eval"):
            keep = [f"{m['patched']:.0%} ({m['base']:.0%})" for m in
                    (r["eval"]["specificity.neighbours"], r["eval"]["specificity.other_kinds"])]
        lines.append(f"| {r['concept']} | {r['patch']} | {r['train_seconds'] or 'n/a'} | " + " | ".join(cells) +
                     f" | {keep[0]} | {keep[1]} |")
    return "\n".join(lines)


def family_table(rows) -> str:
    """The issue's table: per patch, training seconds, post-attack ASR [95 % CI] under the four attacks, the
    target left (training / held-out prompts) and what is kept as % of base (out of sample)."""
    def asr(r, a):
        if r["asr"].get(a) is None:
            return "–"
        lo, hi = r["ci"][a]
        return f"{r['asr'][a]:.0%} [{lo:.0%}, {hi:.0%}]"

    def kept(ev, key):
        m = (ev or {}).get(key)
        return f"{m['patched'] / m['base']:.0%}" if m and m.get("base") else "–"

    lines = ["| concept | patch | train s | " + " | ".join(f"`{a}`" for a in FAMILY_ATTACKS)
             + " | target (train / held-out) | neighbours | other kinds | compositional |",
             "|" + "---|" * (len(FAMILY_ATTACKS) + 7)]
    for r in rows:
        ev = r.get("eval")
        target = (f"{ev['efficacy']['patched']:.0%} / {ev['generality']['patched']:.0%}"
                  if ev and "efficacy" in ev and "generality" in ev else "–")
        lines.append(f"| {r['concept']} | {r['patch']} | {r['train_seconds'] or '–'} | "
                     + " | ".join(asr(r, a) for a in FAMILY_ATTACKS)
                     + f" | {target} | {kept(ev, 'specificity.neighbours')} | {kept(ev, 'specificity.other_kinds')}"
                     f" | {kept(ev, 'specificity.compositional')} |")
    return "\n".join(lines)


def ci_table(rows) -> str:
    """One line per (patch, attack) measured: ASR with its bootstrap 95 % interval, images, base rate."""
    lines = ["| concept | patch | attack | ASR [95% CI] | images | base rate | steps | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for a in ATTACKS:
            if r["asr"].get(a) is None or "ci" not in r:
                continue
            lo, hi = r["ci"][a]
            steps = r.get("steps", {}).get(a, "")
            lines.append(f"| {r['concept']} | {r['patch']} | {a} | {r['asr'][a]:.0%} [{lo:.0%}, {hi:.0%}] | "
                         f"{r['n'][a]} | {r['base'][a]:.0%} | {steps} | {r['seconds'][a] or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
