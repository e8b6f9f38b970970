"""Robustness benchmark behind docs/robustness.md: for one style, one object and one identity concept,
train the default fmn patch and a --robust one, attack both with fixed seeds and budgets, and measure
what the patch keeps (eval's specificity). Writes a Markdown table and a JSON file.

    .venv/bin/python benchmarks/bench_robustness.py [--model M] [--concepts style:stripes object:star identity:kiko]
        [--steps N] [--seeds 2] [--out benchmarks/robustness.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchforge.eval.attacks import attack_patch  # noqa: E402
from patchforge.eval.evaluation import default_judge, evaluate  # noqa: E402
from patchforge.core.pipeline_loading import load_pipeline  # noqa: E402
from patchforge.train.robust import RobustConfig, wrap_trainer  # noqa: E402
from patchforge.train.loop import TrainConfig, train_patch  # noqa: E402

BUDGET = {"prompts": 4, "soft_tokens": 4, "soft_steps": 30, "inv_tokens": 2, "inv_steps": 40, "inv_images": 8,
          "probe_images": 8, "strength": 0.6, "seed": 0}
ATTACKS = ["misspelling", "paraphrase", "described", "padding", "soft_prompt", "inversion", "unconditional", "partial"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--concepts", nargs="+", default=["style:stripes", "object:star", "identity:kiko"])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    ap.add_argument("--inner-steps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/robustness.json")
    ap.add_argument("--patch-dir", default="benchmarks/robustness_patches")
    args = ap.parse_args()
    pipe, judge = load_pipeline(args.model, device="cpu"), default_judge(args.model)
    # Rows for concepts not rerun now are kept, so one concept can be re-measured without redoing all (~8 min each).
    out_path = Path(args.out)
    rows = [r for r in (json.loads(out_path.read_text())["rows"] if out_path.exists() else [])
            if r["concept"] not in args.concepts]
    for concept in args.concepts:
        for robust in (False, True):
            tag = "robust" if robust else "default"
            out = Path(args.patch_dir) / f"{concept.replace(':', '-')}.fmn.{tag}.safetensors"
            cfg = TrainConfig(method="fmn", steps=args.steps, progress=False)
            hook = (lambda tr: wrap_trainer(tr, RobustConfig(inner_steps=args.inner_steps))) if robust else None
            t0 = time.time()
            path, summary = train_patch([concept], "fmn", args.model, cfg, out=out, pipe=pipe, robust=hook)
            train_s = time.time() - t0
            att = attack_patch(path, args.model, BUDGET, args.seeds, judge=judge, pipe=pipe)
            ev = evaluate([path], args.model, seeds=args.seeds, n=4, judge=judge, pipe=pipe,
                          progress=lambda m: None)["patches"][0]["metrics"]
            keep = {k: ev[k] for k in ("efficacy", "generality", "specificity.neighbours", "specificity.other_kinds")}
            rows.append({"concept": concept, "patch": tag, "train_seconds": round(train_s, 1),
                         "asr": {k: att["attacks"][k]["patched"] for k in ATTACKS if k in att["attacks"]},
                         "base": {k: att["attacks"][k]["base"] for k in ATTACKS if k in att["attacks"]},
                         "eval": keep, "attack_seconds": att["seconds"]})
            print(json.dumps(rows[-1]["asr"]), concept, tag, f"train {train_s:.0f}s", flush=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"budget": BUDGET, "seeds": args.seeds, "rows": rows}, indent=1))
            tmp.replace(out_path)
    print(table(rows))


def table(rows) -> str:
    head = ("| concept | patch | train s | " + " | ".join(ATTACKS)
            + " | neighbours kept (base) | other kinds kept (base) |")
    lines = [head, "|" + "---|" * (len(ATTACKS) + 5)]
    for r in rows:
        cells = [f"{r['asr'][a]:.0%}" if r["asr"].get(a) is not None else "n/a" for a in ATTACKS]
        nb, ok = r["eval"]["specificity.neighbours"], r["eval"]["specificity.other_kinds"]
        lines.append(f"| {r['concept']} | {r['patch']} | {r['train_seconds']} | " + " | ".join(cells) +
                     f" | {nb['patched']:.0%} ({nb['base']:.0%}) | {ok['patched']:.0%} ({ok['base']:.0%}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
