"""What a forget patch costs on SD 1.5-, SDXL-, SD3.5-medium- and FLUX.1-sized pipelines: seconds per
step, reference generation, peak memory and patch size, at the family defaults and at a CPU smoke setting.

The pipelines have the real architectures (benchmarks/bench_gpu.py's configs) with random weights,
saved as diffusers folders (SD 1.5 in fp32 as its checkpoint ships, SDXL in fp16 as its usual
variant does); timing and memory do not depend on weight values. Each row is one
`patchforge train --concept style:vangogh --model FOLDER ...` process, as a user would run it, with
a cold reference cache; its peak RSS is the kernel's count for that process (os.wait4).

Settings:
    smoke     --steps 2 --resolution 256 --ref-images 2   (the CPU check of docs/real-models.md)
    defaults  the family's defaults (resolution, batch, reference images), --steps N (default 2):
              seconds per step are per step, so a few steps measure them; a full patch is 80 steps

    python benchmarks/bench_real_sizes.py [--arch sd15 sdxl] [--setting smoke defaults]
        [--workdir /tmp/pf_real] [--steps 2] [--tiny]

--tiny shrinks every width to check the script in seconds; its numbers mean nothing. Run one size
at a time on a shared machine: SDXL alone needs ~12 GiB on a CPU.

The transformers (`--arch sd35m flux1`, benchmarks/dit_sizes.py) are built in bf16 and run only where a
GPU is present: FLUX.1's 12 B-parameter transformer alone is 24 GB in bf16, and an SD3.5-medium step
takes many minutes on a CPU. Elsewhere (or with --dry-run, for any arch) a row is the plan only:
`patchforge train`'s memory estimate from the real configs, parameters counted on PyTorch's meta
device, nothing built or run.
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
from bench_gpu import SD15, SDXL, build, shrink
from dit_sizes import CONFIGS as DIT_CONFIGS
from dit_sizes import build_dit, meta_facts, shrink_dit

SETTINGS = {"smoke": ["--resolution", "256", "--ref-images", "2"], "defaults": []}
DISK_DTYPE = {"sd15": torch.float32, "sdxl": torch.float16}
SUMMARY = re.compile(r"\((?P<refs>[\d.]+) s references, (?P<step>[\d.]+) s/step, peak RSS (?P<rss>[\d.]+) GiB, "
                     r"expected (?P<expected>[\d.]+)\).* patch (?P<kib>\d+) KiB")
PLAN = re.compile(r"plan: .*?, (?P<res>\d+) px .*? batch (?P<batch>\d+):")


def run_train(folder: Path, setting: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    """One training process; its wall time, peak RSS and the summary it prints."""
    cache = workdir / f"cache-{folder.name}-{setting}"
    shutil.rmtree(cache, ignore_errors=True)  # cold: the references are generated in the run
    patch = workdir / f"{folder.name}-{setting}.safetensors"
    env = {**os.environ, "PATCHFORGE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "patchforge.cli", "train", "--concept", "style:vangogh", "--model", str(folder),
           "--steps", str(steps), "--out", str(patch), *SETTINGS[setting], *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    row = {"wall": wall, "rss_gib": usage.ru_maxrss * 1024 / 2**30, "ok": os.waitstatus_to_exitcode(status) == 0,
           "output": out.strip().splitlines()[-1] if out.strip() else ""}
    for pattern in (SUMMARY, PLAN):
        m = pattern.search(out)
        if m:
            row.update(m.groupdict())
    return row


def plan_row(arch: str, folder: Path, setting: str, steps: int) -> str:
    """A table row from `train --dry-run`: the plan's expected peak, nothing measured."""
    cmd = [sys.executable, "-m", "patchforge.cli", "train", "--concept", "style:vangogh", "--model", str(folder),
           "--steps", str(steps), "--dry-run", *SETTINGS[setting]]
    out = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True).stdout
    m, peak = PLAN.search(out), re.search(r"expected peak (?P<gib>[\d.]+) GiB", out)
    if not m or not peak:
        return f"| {arch} | {setting} | ? | ? | not run | | | | | {out.strip()[:160]} |"
    return (f"| {arch} | {setting} (planned only) | {m['res']} | {m['batch']} | not run | not run | - | - | "
            f"{float(peak['gib']):.1f} | - |")


def table_row(arch: str, setting: str, r: dict) -> str:
    if r["ok"] and "step" in r:
        return (f"| {arch} | {setting} | {r.get('res', '?')} | {r.get('batch', '?')} | {float(r['step']):.1f} | "
                f"{float(r['refs']):.1f} | {r['wall']:.0f} | {r['rss_gib']:.1f} | {float(r['expected']):.1f} | "
                f"{int(r['kib'])} |")
    return (f"| {arch} | {setting} | {r.get('res', '?')} | {r.get('batch', '?')} | - | - | {r['wall']:.0f} | "
            f"{r['rss_gib']:.1f} | - | {r['output'][:160]} |")


def meta_plan_row(arch: str, setting: str, steps: int, gpu_gib: float | None = None) -> str:
    """A row from the plan alone, the model never built: parameters counted on the meta device. gpu_gib:
    plan as on a CUDA device with that much memory (bf16), not on this machine."""
    from patchforge.errors import PatchforgeError
    from patchforge.methods import get_method
    from patchforge.core.pipeline_loading import pick_device
    from patchforge.train.loop import TrainConfig, resolve_run

    smoke = {"resolution": 256, "ref_images": 2} if setting == "smoke" else {}
    gpu = {"precision": "bf16", "max_memory_gib": gpu_gib} if gpu_gib else {}
    cfg = TrainConfig(steps=steps, batch=None, **smoke, **gpu)
    method = get_method(cfg.method)
    device = torch.device("cuda") if gpu_gib else pick_device(None)
    where = f"{setting}, planned for a {gpu_gib:g} GiB GPU" if gpu_gib else f"{setting} (planned only)"
    try:
        plan = resolve_run(["style:vangogh"], cfg, method.Config(), meta_facts(arch, DIT_CONFIGS[arch]),
                           device=device).plan
    except PatchforgeError as err:  # the honest plan on this machine: it does not fit
        return f"| {arch} | {where} | | | not run | not run | - | - | - | {str(err)[:200]} |"
    print(plan.line(cfg.method), flush=True)
    return (f"| {arch} | {where} | {plan.resolution} | {plan.batch} | not run | not run | - | - | "
            f"{plan.estimate.device_total(plan.device) / 2**30:.1f} | - |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", *DIT_CONFIGS])
    ap.add_argument("--setting", nargs="+", default=["smoke", "defaults"], choices=list(SETTINGS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pf_real"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="toy widths: check the script, not the hardware")
    ap.add_argument("--train-arg", action="append", default=[], help="extra `patchforge train` argument")
    ap.add_argument("--plan-only", nargs="*", default=[], choices=list(SETTINGS), metavar="SETTING",
                    help="settings only planned (train --dry-run: expected peak, nothing run), e.g. defaults on a CPU")
    ap.add_argument("--dry-run", action="store_true", help="plan every row from the configs; build and run nothing")
    ap.add_argument("--plan-gpu-gib", type=float, default=None, metavar="GIB",
                    help="with planned transformer rows: also plan them for a CUDA device with this much memory")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    if torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    rows = []
    for arch in args.arch:
        if args.dry_run or (arch in DIT_CONFIGS and not torch.cuda.is_available() and not args.tiny):
            if arch not in DIT_CONFIGS:
                rows += [plan_row(arch, build(arch, {"sd15": SD15, "sdxl": SDXL}[arch], args.workdir / arch,
                                              DISK_DTYPE[arch]), s, args.steps) for s in args.setting]
            else:  # transformers run on a GPU only (module docstring)
                rows += [meta_plan_row(arch, s, args.steps) for s in args.setting]
                if args.plan_gpu_gib:
                    rows += [meta_plan_row(arch, s, args.steps, args.plan_gpu_gib) for s in args.setting]
            print("\n".join(rows[-len(args.setting) * (2 if args.plan_gpu_gib else 1):]), flush=True)
            continue
        if arch in DIT_CONFIGS:
            cfg = shrink_dit(DIT_CONFIGS[arch]) if args.tiny else DIT_CONFIGS[arch]
            folder = build_dit(arch, cfg, args.workdir / (arch + ("-tiny" if args.tiny else "")),
                               torch.float32 if args.tiny else torch.bfloat16)
            for setting in args.setting:
                r = run_train(folder, setting, args.steps, args.workdir, args.train_arg)
                rows.append(table_row(arch + (" (tiny)" if args.tiny else ""), setting, r))
                print(rows[-1], flush=True)
            continue
        cfg = {"sd15": SD15, "sdxl": SDXL}[arch]
        cfg = shrink(cfg) if args.tiny else cfg
        folder = build(arch, cfg, args.workdir / (arch + ("-tiny" if args.tiny else "")), DISK_DTYPE[arch])
        for setting in args.setting:
            if setting in args.plan_only:
                rows.append(plan_row(arch + (" (tiny)" if args.tiny else ""), folder, setting, args.steps))
                print(rows[-1], flush=True)
                continue
            r = run_train(folder, setting, args.steps, args.workdir, args.train_arg)
            rows.append(table_row(arch + (" (tiny)" if args.tiny else ""), setting, r))
            print(rows[-1], flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {device}, `python benchmarks/bench_real_sizes.py "
          f"{' '.join(sys.argv[1:])}`: `patchforge train --concept style:vangogh --steps {args.steps}`, cold reference "
          "cache\n")
    print("| pipeline | setting | px | batch | s/step | references s | wall s | peak RSS GiB | expected GiB "
          "| patch KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
