"""Time to load and activate 1, 10 and 50 forget patches on the toy model, against loading one
plain LoRA with diffusers. Prints a markdown table (docs/benchmarks.md, section "Patch loading").

    .venv/bin/python benchmarks/bench_loading.py [--model PATH] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from patchforge.io import loading  # noqa: E402
from patchforge.io.saving import save_patch_from_pipeline  # noqa: E402
from patchforge.core.pipeline_loading import TOY_MODEL_DIR, load_pipeline  # noqa: E402

FALLBACK = "/tmp/toytrial/pipeline"  # an undertrained pipeline of the toy architecture


def make_patches(pipe, folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        for model, targets in ((pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                               (pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])):
            model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                              adapter_name="tmp")
        paths.append(save_patch_from_pipeline(pipe, folder / f"p{i}.safetensors", adapter_name="tmp", metadata={
            "patchforge.concept": f"concept {i}", "patchforge.method": "bench",
            "patchforge.hyperparameters": json.dumps({"r": 4})}))
        pipe.delete_adapters("tmp")
        pipe.unload_lora_weights()
    return paths


def load_patches(pipe, paths) -> float:
    """Seconds to load every patch with load_forget_patch, all active (then unloaded again)."""
    t = time.perf_counter()
    for p in paths:
        loading.load_forget_patch(pipe, p)
    dt = time.perf_counter() - t
    assert len(pipe.get_active_adapters()) == len(paths)
    loading.unload_forget_patches(pipe)
    return dt


def load_plain_loras(pipe, paths) -> float:
    """diffusers alone: the same files loaded one after another with load_lora_weights, then
    set_adapters once so all are active (then unloaded again)."""
    t = time.perf_counter()
    for i, p in enumerate(paths):
        pipe.load_lora_weights(str(p), adapter_name=f"plain{i}")
    pipe.set_adapters([f"plain{i}" for i in range(len(paths))])
    dt = time.perf_counter() - t
    pipe.unload_lora_weights()
    return dt


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = fn()
        best = min(best, t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    default = TOY_MODEL_DIR / "pipeline"
    ap.add_argument("--model", default=str(default) if (default / "model_index.json").exists() else FALLBACK)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="bench_patches_"))
    paths = make_patches(pipe, folder, max(args.counts))

    def plain() -> float:
        t = time.perf_counter()
        pipe.load_lora_weights(str(paths[0]), adapter_name="plain")
        dt = time.perf_counter() - t
        pipe.unload_lora_weights()
        return dt

    patches = lambda n: lambda: load_patches(pipe, paths[:n])  # noqa: E731
    plain_stack = lambda n: lambda: load_plain_loras(pipe, paths[:n])  # noqa: E731

    base = timed(plain, args.repeats)
    rows = [("1 plain LoRA (diffusers `load_lora_weights`)", 1, base)]
    rows += [(f"{n} forget patch{'es' if n > 1 else ''} (`load_forget_patch`, all active)", n,
              timed(patches(n), args.repeats if n < 50 else 1)) for n in args.counts]
    n = max(args.counts)
    rows.append((f"{n} plain LoRAs (diffusers `load_lora_weights` + `set_adapters`, for context)", n,
                 timed(plain_stack(n), 1)))
    print(f"model: {args.model}  (UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f} M params), "
          f"patches: rank 4, UNet attention + text encoder, torch threads 1, best of {args.repeats}")
    print()
    print("| What | Patches | Total (s) | Per patch (ms) | Per patch / plain LoRA |")
    print("|---|---:|---:|---:|---:|")
    for what, n, t in rows:
        print(f"| {what} | {n} | {t:.3f} | {1000 * t / n:.1f} | {t / n / base:.2f}x |")


if __name__ == "__main__":
    main()
