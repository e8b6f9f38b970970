"""Per-image cost of 50 fused patches over the base, counted instead of raced.

    OMP_NUM_THREADS=1 python benchmarks/bench_fused.py [--patches 50]

What the fused form adds to a base forward pass is PEFT's wrapper call in front of each patched layer
(merged: it calls the base layer only) and patchforge's guard before each forward pass. Each is timed
per call, at the inputs a real generation gives it (best of many short loops, which a shared machine
disturbs far less than whole images), multiplied by the calls one image makes, and set against the
CPU time of one image. Racing whole images against the base instead (bench_many.py --parts 4) swings
by ±10 % on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best(fn, n: int = 200, reps: int = 15) -> float:
    """Seconds per call, best of `reps` loops of `n` calls."""
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out = min(out, (time.perf_counter() - t) / n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=50)
    args = ap.parse_args(argv)
    import torch
    import transformers
    from bench_loading import make_patches
    from peft.tuners.tuners_utils import BaseTunerLayer

    from patchforge.io import loading
    from patchforge.eval.evaluation import generate
    from patchforge.core.pipeline_loading import load_pipeline

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    pipe = load_pipeline(None, device="cpu")
    for p in make_patches(pipe, Path(tempfile.mkdtemp(prefix="bench_fused_")), args.patches):
        loading.load_forget_patch(pipe, p)
    loading.fuse_forget_patches(pipe)
    layers = [m for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules() if isinstance(m, BaseTunerLayer)]

    inputs, calls = {}, [0]

    def record(module, call_args) -> None:  # the input each wrapper sees in a real generation
        calls[0] += 1
        inputs.setdefault(id(module), (module, call_args[0].detach().clone()))

    prompts, seeds = ["a red star in stripes style"] * 8, list(range(8))
    handles = [m.register_forward_pre_hook(record) for m in layers]
    generate(pipe, prompts, seeds)
    for h in handles:
        h.remove()
    t = time.process_time()
    generate(pipe, prompts, seeds)
    per_image = (time.process_time() - t) / len(seeds)

    with torch.no_grad():
        wrapper = sum(best(lambda: m(x)) - best(lambda: m.base_layer(x)) for m, x in inputs.values()) / len(inputs)
    guards = list(pipe.unet._forward_pre_hooks.values())
    guard = best(lambda: [g(pipe.unet, ()) for g in guards], n=2000)
    unet_calls = {"n": 0}
    counter = pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.__setitem__("n", unet_calls["n"] + 1))
    generate(pipe, prompts, seeds)
    counter.remove()
    extra = calls[0] / len(seeds) * wrapper + unet_calls["n"] / len(seeds) * guard
    print(f"{args.patches} fused patches: {len(layers)} wrapped layers, {calls[0] / len(seeds):.0f} wrapper calls "
          f"per image, {wrapper * 1e6:.1f} µs each over the base layer; guard {guard * 1e6:.1f} µs per UNet forward "
          f"({unet_calls['n'] / len(seeds):.1f} per image); one image {per_image:.4f} CPU s; fused adds "
          f"{extra * 1e3:.2f} ms per image = {extra / per_image:+.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
