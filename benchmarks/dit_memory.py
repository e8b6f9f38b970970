"""Peak memory of `patchforge train` on diffusion transformers against the plan's estimate, for
calibrating the transformer terms of patchforge/core/plan.py.

Each row is one training process (`--steps 2 --ref-images 2`, cold reference cache), as a user runs it,
its peak RSS the kernel's count (the summary line's "peak RSS"), beside the "expected" the plan printed.
The pipelines are SD3.5-medium- and FLUX.1-layout transformers with random weights at the released
widths (1536 = 24 heads of 64; 3072 = 24 heads of 128) but fewer blocks, so that they fit a 24 GiB
machine; the text encoders are small (the transformer's activations depend on the token count and the
width, not on the encoders' size), the VAE is the released one. Plus the embedded DiT toy's default
star patch (`--model patchforge/toy-sd3 --concept object:star`, its defaults, 160 steps).

    python benchmarks/dit_memory.py [--rows toy sd35m-2 flux-1] [--workdir /tmp/pf_dit_mem] [--method uce]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dit_sizes import CONFIGS, T5_XXL, build_dit

SUMMARY = re.compile(r"peak RSS (?P<rss>[\d.]+) GiB, expected (?P<expected>[\d.]+)\)")
# name -> (arch, transformer overrides, --resolution, --batch); None: the toy's own defaults
ROWS = {
    "toy": None,
    "sd35m-2-256": ("sd35m", dict(num_layers=2, dual_attention_layers=(0,)), 256, 1),
    "sd35m-2-512": ("sd35m", dict(num_layers=2, dual_attention_layers=(0,)), 512, 1),
    "sd35m-4-512-b2": ("sd35m", dict(num_layers=4, dual_attention_layers=(0,)), 512, 2),
    "flux-1+1-256": ("flux1", dict(num_layers=1, num_single_layers=1), 256, 1),
    "flux-1+2-512": ("flux1", dict(num_layers=1, num_single_layers=2), 512, 1),
    # T5's released width (4096), one layer: what uce's token rows and its solve on context_embedder cost
    "flux-1+1-256-t4096": ("flux1", dict(num_layers=1, num_single_layers=1), 256, 1),
}
TEXT_WIDTH = 256  # the small encoders' width (the transformer's joint_attention_dim follows it)
TEXT_WIDTHS = {"flux-1+1-256-t4096": 4096}  # rows at another text width


def folder_for(name: str, workdir: Path) -> Path:
    arch, overrides, _, _ = ROWS[name]
    base, width = CONFIGS[arch], TEXT_WIDTHS.get(name, TEXT_WIDTH)
    cfg = dict(base, transformer=dict(base["transformer"], joint_attention_dim=width, **overrides),
               clip=[dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                          **({"projection_dim": 64} if "projection_dim" in c else {})) for c in base["clip"]],
               t5=dict(T5_XXL, d_model=width, d_kv=32, d_ff=512, num_layers=1, num_heads=8))
    if arch == "sd35m":
        cfg["transformer"]["pooled_projection_dim"] = 128  # the two small CLIPs' pooled outputs, concatenated
    else:
        cfg["transformer"]["pooled_projection_dim"] = 64
    return build_dit(arch, cfg, workdir / name, dtype=torch.float32)


def run(name: str, workdir: Path, method: str = "fmn") -> dict:
    cache = workdir / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PATCHFORGE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = workdir / f"{name}.safetensors"
    if ROWS[name] is None:
        args = ["--model", "patchforge/toy-sd3", "--concept", "object:star"]
    else:
        _, _, res, batch = ROWS[name]
        args = ["--model", str(folder_for(name, workdir)), "--concept", "style:vangogh", "--steps", "2",
                "--ref-images", "2", "--resolution", str(res), "--batch", str(batch), "--precision", "fp32",
                "--method", method]
    t0 = time.perf_counter()
    # the child reports its own peak RSS (a closed form's summary has no plan line to compare with)
    child = ("import resource, runpy, sys; sys.argv = ['patchforge'] + sys.argv[1:]\n"
             "try: runpy.run_module('patchforge.cli', run_name='__main__')\n"
             "finally: print(f'child peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')")
    proc = subprocess.run([sys.executable, "-c", child, "train", *args, "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    found, peak = SUMMARY.search(text), re.search(r"child peak RSS (?P<rss>[\d.]+) GiB", text)
    if proc.returncode or not peak:
        return {"row": name, "error": text.strip().splitlines()[-1] if text.strip() else f"rc {proc.returncode}"}
    return {"row": name, "peak": float(peak["rss"]), "expected": float(found["expected"]) if found else None,
            "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf_dit_mem"))
    ap.add_argument("--method", default="fmn", help="the training method (uce: the closed form's rows and solve)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("| row | peak RSS (GiB) | plan expected (GiB) | expected / peak | wall s |\n|---|---|---|---|---|")
    for name in args.rows:
        r = run(name, args.workdir, args.method)
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:100]} | | | |", flush=True)
            continue
        expected = (f"{r['expected']:.2f} | {r['expected'] / r['peak']:.2f}" if r["expected"] is not None
                    else "– (closed form) | –")
        print(f"| {name} | {r['peak']:.2f} | {expected} | {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
