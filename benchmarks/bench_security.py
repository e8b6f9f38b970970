"""The costs and bars of the patch-safety checks (docs/security.md), measured on a CPU.

    python benchmarks/bench_security.py fingerprint   # seconds per base_fingerprint on SD 1.5 / SDXL shapes
    python benchmarks/bench_security.py read          # peak RSS of reading a ~75 MB patch, and of refusing one
    python benchmarks/bench_security.py cycles [N]    # N x (load, set weight, fuse, unfuse, unload): exact? RSS?

fingerprint: the UNet and text encoders are built with the real architectures' configs (bench_gpu.py)
on the meta device and given uninitialised memory: the fingerprint reads a sample of every tensor,
so its time depends on the shapes, not on the values (and untouched pages cost no RAM).
cycles: the tiny SD 1.x test pipeline with two random patches (random A and B, UNet + text encoder).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench_gpu import SD15, SDXL
    from patchforge.io.fingerprint import base_fingerprint

    torch.set_num_threads(1)
    for arch, cfg in (("sd15", SD15), ("sdxl", SDXL)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg["unet"])
            texts = [(CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(
                CLIPTextConfig(vocab_size=49408, **t)) for t in cfg["text"]]
        unet.to_empty(device="cpu")
        for t in texts:
            t.to_empty(device="cpu")
        pipe = SimpleNamespace(unet=unet, text_encoder=texts[0], text_encoder_2=texts[1] if len(texts) > 1 else None,
                               scheduler=None, name_or_path=arch, config={})
        n = sum(p.numel() for m in [unet, *texts] for p in m.parameters())
        tensors = sum(1 for m in [unet, *texts] for _ in m.parameters())
        base_fingerprint(pipe)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            base_fingerprint(pipe)
            times.append(time.perf_counter() - t0)
        big = sum(1 for m in [unet, *texts] for p in m.parameters() if p.numel() > 2**24)
        print(json.dumps({"arch": arch, "params": n, "tensors": tensors, "tensors_over_2^24": big,
                          "fingerprint_s": [round(t, 3) for t in times]}))
        del unet, texts, pipe


def read() -> None:
    """Each measurement in a fresh process: ru_maxrss is a high-water mark."""
    import tempfile

    from patchforge.io.saving import save_patch_from_pipeline  # noqa: F401 (import cost outside the child)

    folder = Path(tempfile.mkdtemp())
    code = r"""
import sys, json, threading, time, resource, torch, safetensors.torch
sys.path[:0] = [sys.argv[1]]
from patchforge.io.patch_format import read_patch
from patchforge.errors import PatchFormatError
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
peak, done = [0.0], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
before = rss()
t = threading.Thread(target=watch); t.start()
try:
    patch = read_patch(sys.argv[2])
    outcome = "read"
except PatchFormatError as err:
    outcome = "refused: " + str(err)[:70]
done.append(1); t.join()
print(json.dumps({"file": sys.argv[2].rsplit("/", 1)[-1],
                  "peak_rss_increase_mb": round(max(peak[0], rss()) - before, 1), "outcome": outcome}))
"""
    import safetensors.torch

    from tiny_pipelines import cached_patches

    good = cached_patches("sd1")[0]
    with safetensors.safe_open(str(good), "pt") as f:
        md = dict(f.metadata())
    # ~75 MB: one module's A/B scaled up to a rank that makes the file that big
    sd = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(64,
                                                                                                       150_000) * 1e-3,
          "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(150_000,
                                                                                                       64) * 1e-3}
    ok_md = dict(md, lora_adapter_metadata=json.dumps({"unet.r": 64, "unet.lora_alpha": 64}))
    safetensors.torch.save_file(sd, str(folder / "big.safetensors"), metadata=ok_md)
    bad_md = dict(ok_md, lora_adapter_metadata=json.dumps({"unet.r": 64, "unet.init_lora_weights": "pissa"}))
    safetensors.torch.save_file(sd, str(folder / "big-pissa.safetensors"), metadata=bad_md)
    for name in ("big.safetensors", "big-pissa.safetensors"):
        size = (folder / name).stat().st_size / 2**20
        for root in [ROOT] + [Path(p) for p in sys.argv[2:]]:  # other checkouts to compare with, e.g. the old reader
            out = subprocess.run([sys.executable, "-c", code, str(root), str(folder / name)], capture_output=True,
                                 text=True)
            print(out.stdout.strip() or out.stderr[-500:], f"(file {size:.1f} MiB, reader from {root})")


def cycles(n: int) -> None:
    import gc

    from patchforge.io import loading as pf
    from test_security import pipeline_state
    from tiny_pipelines import cached_patches, run, tiny_sd1

    torch.set_num_threads(1)
    pipe = tiny_sd1()
    patches = cached_patches("sd1")[:2]
    base_state, base_out = pipeline_state(pipe), run(pipe)
    # one warm-up cycle so lazy imports and allocator pools are counted before the first reading
    for p in patches:
        pf.load_forget_patch(pipe, p)
    pf.unload_forget_patches(pipe)
    gc.collect()
    rss = [rss_mb()]
    t0 = time.perf_counter()
    exact = 0
    for i in range(n):
        names = [pf.load_forget_patch(pipe, p, weight=0.5 + 0.1 * k) for k, p in enumerate(patches)]
        pf.set_forget_patch_weight(pipe, names[0], -0.3 + 0.01 * (i % 50))
        pf.fuse_forget_patches(pipe)
        pf.unfuse_forget_patches(pipe)
        pf.unload_forget_patches(pipe)
        exact += pipeline_state(pipe) == base_state
        if (i + 1) % max(1, n // 4) == 0:
            gc.collect()
            rss.append(rss_mb())
    print(json.dumps({"cycles": n, "base_state_bit_identical_after": f"{exact}/{n}",
                      "outputs_identical": bool(torch.equal(run(pipe), base_out)),
                      "rss_mb": [round(r, 1) for r in rss], "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "cycles"
    if what == "fingerprint":
        fingerprint()
    elif what == "read":
        read()
    else:
        cycles(int(sys.argv[2]) if len(sys.argv) > 2 else 200)
