"""`patchforge demo`: the README's main job on the embedded toy model, end to end:
train a forget patch, evaluate it against the base model, write a before/after picture."""
from __future__ import annotations

import time


def run_command(args) -> int:
    from .eval.evaluation import evaluate
    from .eval.report import markdown, write_reports
    from .core.pipeline_loading import load_pipeline
    from .train.loop import TrainConfig, train_patch

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(None, device="cpu")
    print(f"[1/2] training a forget patch for {args.concept} with {args.method} on the embedded toy model")
    patch, summary = train_patch([args.concept], method=args.method,
                                 config=TrainConfig(method=args.method, seed=args.seed),
                                 out=args.out / f"{args.concept.replace(':', '-')}.{args.method}.safetensors",
                                 pipe=pipe)
    print(f"      {summary['steps']} steps in {summary['seconds']} s, {summary['bytes'] / 1024:.0f} KB -> {patch}")
    print("[2/2] evaluating it against the base model (same prompts, same seeds)")
    result = evaluate([patch], seeds=args.seeds, pipe=pipe, progress=lambda m: print("      " + m))
    written = write_reports(result, args.out, f"patchforge demo --concept {args.concept} --method {args.method}")
    print()
    print(markdown(result["patches"]))
    print()
    for path in written:
        print(f"wrote {path}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0
