"""fmn's default against faster settings, in one run: training wall time and the erasure each buys.

    python benchmarks/bench_fmn_fast.py [--variants "default;teacher_pool=20;..."] [--concepts ...]
                                        [--model DIR] [--seeds 2] [--n 6] [--threads 1]

A variant is `default` or `;`-free `key=value,key=value` overrides (steps, lr, rank, batch or any fmn
option: `teacher_pool=20,steps=40`). Every (variant, concept) patch is trained on the same loaded
pipeline with the base's reference images already cached (one untimed 1-step run per concept first),
so "train s" is the training itself, as a user pays it on the second patch of a model: wall seconds
from `train_patch`. Then each is measured as bench_methods.py measures it (patchforge.eval.evaluate,
same image seeds for all, a judge no training loss sees). Run on a quiet machine: wall time depends on
what else runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_methods import DEFAULT_CONCEPTS, _p, _pct

from patchforge.cli import key_value


def parse_variant(text: str) -> dict:
    if text.strip() == "default":
        return {}
    return dict(key_value(kv.strip()) for kv in text.split(",") if kv.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default;teacher_pool=20;teacher_pool=20,steps=40,lr=0.008")
    ap.add_argument("--concepts", default=DEFAULT_CONCEPTS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from patchforge.core.pipeline_loading import load_pipeline
    from patchforge.eval.evaluation import evaluate
    from patchforge.train.loop import TrainConfig, train_patch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.time()
    pipe = load_pipeline(args.model, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="bench_fmn_fast_"))
    concepts, variants = args.concepts.split(","), [v for v in args.variants.split(";") if v.strip()]
    for concept in concepts:  # the references, cached once: no variant pays for them
        train_patch([concept], "fmn", args.model, TrainConfig(steps=1, progress=False), out=work / "warm.safetensors",
                    pipe=pipe)
    rows = []
    for variant in variants:
        over = parse_variant(variant)
        loop = {k: over[k] for k in ("steps", "lr", "rank", "batch") if k in over}
        for concept in concepts:
            cfg = TrainConfig(progress=False, **loop, options={k: v for k, v in over.items() if k not in loop})
            out = work / f"{len(rows)}.safetensors"
            path, s = train_patch([concept], "fmn", args.model, cfg, out=out, pipe=pipe)
            m = evaluate([path], args.model, seeds=args.seeds, n=args.n, pipe=pipe,
                         progress=lambda *_: None)["patches"][0]["metrics"]
            rows.append((variant, concept, s["seconds"], m))
            print(f"{variant} {concept}: {s['seconds']:.1f} s", file=sys.stderr, flush=True)

    def pair(m, key):
        return f"{_pct(_p(m.get(key), 'base'))} → {_pct(_p(m.get(key)))}"

    print("| variant | concept | train s | efficacy ↓ | generality ↓ | neighbours ↑ | other kinds ↑ "
          "| compositional ↑ |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, concept, seconds, m in rows:
        print(f"| {variant} | {concept} | {seconds:.1f} | {pair(m, 'efficacy')} | {pair(m, 'generality')} | "
              f"{pair(m, 'specificity.neighbours')} | {pair(m, 'specificity.other_kinds')} | "
              f"{pair(m, 'specificity.compositional')} |")
    print(f"\n{args.seeds} image seeds x {args.n} prompts per set; torch threads {torch.get_num_threads()}; "
          f"{(time.time() - t_all) / 60:.0f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
