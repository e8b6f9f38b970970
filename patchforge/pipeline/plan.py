"""What a training run will cost, worked out before it runs: the model family and its defaults, the
precision, and the expected peak memory, so that a run that cannot fit is refused at the start.

Families. The toy model and the tiny test pipelines are "toy": their defaults are the ones every toy
result was measured with, and never change. The backbone of each family (patchforge.backbones) names
it from its denoiser config, as patch metadata does: SD 1.x, SD 2.x and SDXL by their cross-attention
width (768, 1024, 2048 with a second text encoder), SD3 / SD3.5 and FLUX.1 by their transformer
config. For a transformer F below is a rough count instead (its backbone's feature_values), not fitted.

Peak memory (bytes), the estimate printed in the plan line and checked against what is free:

    runtime      0.8 GiB                      Python, torch, diffusers, peft (measured at import)
    weights      sum over UNet, text encoders and VAE of parameters x bytes of the chosen dtype
    loading      the largest component's file on disk: it is memory-mapped while it is converted
    activations  W x UNet weight bytes + rows x K x F x bytes of the dtype, where
                 F = sum over UNet levels l of C_l x (s / 2^l)^2 x (2 L + 1) x (1 + 3 T_l)
                 (C_l channels, s the latent side, L resnets per down block, T_l transformer layers,
                 0 on levels without attention) counts the feature-map values of one row, and
                 K = ACT_K (or ACT_K_CHECKPOINTED with gradient checkpointing) is the number of such
                 values autograd keeps per row and W = WORKSPACE the backward pass's fixed workspace,
                 both fitted on the SD 1.5-sized UNet (docs/real-models.md)
    rows         UNet rows that run with gradients in one step (the method's denoiser_rows())

On a GPU the weights and activations live in GPU memory and are checked against it; loading and
runtime stay in host memory. The estimate is meant to be within ~20 %: it decides refusals, not
allocations.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import TOY_FAMILY, backbone_for_folder, for_pipe, release_defaults
from ..errors import PatchforgeError

GIB = 2 ** 30
RUNTIME_BYTES = int(0.8 * GIB)
# Fitted on the SD 1.5-sized UNet in bf16, one row's forward + backward with a LoRA on text-attention K/V:
# 0.252 GiB above the loaded model at 16x16 latents, 0.362 at 32x32 (0.291 checkpointed): a fixed
# part of 0.13 x the UNet's weight bytes plus K values per feature-map value (docs/real-models.md)
ACT_K = 7.0
ACT_K_CHECKPOINTED = 3.5
WORKSPACE = 0.13


# A diffusion transformer's CPU training run grows in resident memory step after step although no tensor
# is kept: glibc raises its mmap threshold as large blocks are freed, then serves the varying-size
# activations from its heap, which keeps the freed space. Measured 2026-12-06 on the DiT toy's star
# patch (batch 8, one thread, plan 1.4 GiB): peak RSS 1.4 GiB after 10 steps, 1.5 after 20, 1.8 after
# 40, 3.1 after 160, while 3-step runs match the plan at batch 1-16. Fixing glibc's mmap threshold
# was tried (1 MiB: 1.1 GiB at 40 steps but twice the time; 8 MiB: 2.7 GiB at 160 steps, 30 % slower)
# and not kept; malloc_trim after every step reached 2.7 GiB too. The plan counts the growth instead:
# this fraction of the activation estimate per step (set so the plan is at or above all four runs: 1.5 /
# 1.6 / 1.9 / 3.2 GiB planned). The growth rate is fitted at the toy's width only; at SD3.5 / FLUX.1 widths
# 2-step runs peak 29-64 % under the plan (benchmarks/dit_memory.py, docs/real-models.md).
HEAP_GROWTH_PER_STEP = 0.02


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
DENOISERS = ("unet", "transformer")


@dataclass
class ModelFacts:
    """What the plan needs to know about a base model, read from its folder or from a loaded pipeline."""
    family: str  # its defaults' key (backbones.FamilyDefaults.key: "sd1", "flux", "toy"...)
    family_name: str
    denoiser: dict  # the denoiser's config (a UNet config for the SD families)
    params: dict  # component -> parameter count
    file_bytes: dict  # component -> bytes of its weight files (0 for a pipeline already in memory)
    native: int  # the checkpoint's own resolution in pixels
    vae_scale: int = 8
    multiple: int = 0  # training pixels must be a multiple of this (0: the UNet rule, check_resolution)
    joint_attention: bool = False  # text meets image in joint attention (SD3, FLUX), not cross-attention
    backbone: type | None = None  # the family's Backbone class (its feature_values; None: the UNet's)

    @classmethod
    def from_pipe(cls, pipe) -> "ModelFacts":
        backbone = for_pipe(pipe)
        cfg = dict(backbone.denoiser.config)
        name = backbone.family_name()
        params = {c: sum(p.numel() for n, p in getattr(pipe, c).named_parameters() if "lora_" not in n)
                  for c in COMPONENTS if getattr(pipe, c, None) is not None}
        scale = getattr(pipe, "vae_scale_factor", 8)
        return cls(release_defaults(name).key, name, cfg, params, {c: 0 for c in params}, backbone.native_size(),
                   scale, type(backbone).resolution_multiple(cfg, scale), not backbone.text_kv_reads_text,
                   type(backbone))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelFacts | None":
        """From a diffusers folder without loading any weight (configs and safetensors headers);
        None when the folder does not hold what is needed (the load will say why)."""
        folder = Path(folder)
        found = backbone_for_folder(folder)
        if found is None:
            return None
        family_cls, name, cfg = found
        params, sizes = {}, {}
        for comp in COMPONENTS:
            files = _weight_files(folder / comp)
            if files:
                params[comp] = sum(_safetensors_numel(f) for f in files)
                sizes[comp] = sum(f.stat().st_size for f in files)
        if not set(DENOISERS) & set(params):
            return None
        scale = 2 ** (len(_vae_channels(folder)) - 1) if _vae_channels(folder) else 8
        return cls(release_defaults(name).key, name, cfg, params, sizes, family_cls.folder_native(folder, cfg, scale),
                   scale, family_cls.resolution_multiple(cfg, scale), not family_cls.text_kv_reads_text, family_cls)


def _vae_channels(folder: Path) -> list:
    try:
        return json.loads((folder / "vae" / "config.json").read_text()).get("block_out_channels", [])
    except (OSError, ValueError):
        return []


def _weight_files(comp_dir: Path) -> list[Path]:
    """The safetensors files diffusers loads for a component: the plain ones if any, else a variant's."""
    if not comp_dir.is_dir():
        return []
    files = sorted(comp_dir.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]  # a variant is spelt name.fp16.safetensors
    return plain or files


def _safetensors_numel(path: Path) -> int:
    """Parameter count of a safetensors file from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


# ---------------------------------------------------------------- precision
def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX): there bf16 is faster than fp32, not slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(precision: str, family: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype. auto: the toy keeps what it always used (fp32 on CPU, fp16 on CUDA);
    real families use bf16 where the device computes it natively (CUDA with bf16, a CPU with
    AVX512-BF16/AMX), fp16 on other GPUs, else fp32."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in named:
        return named[precision]
    if device.type == "cuda":
        if family != TOY_FAMILY and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu" and family != TOY_FAMILY and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------- memory
def features(facts: ModelFacts, latent_side: int) -> int:
    """F of the module docstring, as the model's family counts it (Backbone.feature_values)."""
    from ..backbones.sd_unet import SDUNet

    return (facts.backbone or SDUNet).feature_values(facts.denoiser, latent_side)


@dataclass
class Estimate:
    weights: int
    loading: int
    activations: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.loading + self.activations + self.runtime

    def device_total(self, device: torch.device) -> int:
        """What must fit in the device's memory: on a GPU, weights and activations only."""
        return self.weights + self.activations if device.type == "cuda" else self.total

    def parts(self) -> str:
        return (f"weights {self.weights / GIB:.1f} + activations {self.activations / GIB:.1f} + "
                f"loading {self.loading / GIB:.1f} + runtime {self.runtime / GIB:.1f} GiB")


def estimate(facts: ModelFacts, dtype: torch.dtype, resolution: int, grad_rows: int, checkpointing: bool,
             loaded: bool = False, cpu_steps: int = 0) -> Estimate:
    """cpu_steps: the steps of a run on a CPU (the heap growth of a transformer's run, above)."""
    nbytes = torch.finfo(dtype).bits // 8
    weights = sum(facts.params.values()) * nbytes
    loading = 0 if loaded else max(facts.file_bytes.values(), default=0)
    k = ACT_K_CHECKPOINTED if checkpointing else ACT_K
    acts = int(grad_rows * k * features(facts, resolution // facts.vae_scale) * nbytes)
    denoiser = next(facts.params[c] for c in DENOISERS if c in facts.params)
    acts += int(WORKSPACE * denoiser * nbytes) if grad_rows else 0
    if facts.joint_attention:
        acts += int(acts * HEAP_GROWTH_PER_STEP * cpu_steps)
    return Estimate(weights, loading, acts)


def available_memory(device: torch.device) -> int:
    """Bytes the run may use: free GPU memory, or the host's MemAvailable plus what this process holds."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
        own = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        return avail + own
    except (OSError, IndexError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak_rss() -> int:
    """This process's peak resident memory so far (bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def check_resolution(resolution: int, facts: ModelFacts) -> None:
    """The UNet halves the latent side once per level: it must divide evenly. A transformer needs whole
    patches (facts.multiple)."""
    step = facts.multiple or facts.vae_scale * 2 ** (len(facts.denoiser["block_out_channels"]) - 1)
    if resolution % step:
        raise PatchforgeError(f"--resolution {resolution}: this {facts.family_name} model needs a multiple of {step} "
                              f"(e.g. {max(step, resolution // step * step)})")


# ---------------------------------------------------------------- the plan
@dataclass
class RunPlan:
    family: str
    family_name: str
    dtype: torch.dtype
    resolution: int
    batch: int
    ref_images: int
    ref_steps: int
    checkpointing: bool
    grad_rows: int
    nograd_rows: int
    steps: int
    estimate: Estimate
    budget: int
    device: torch.device
    capped: bool = False  # budget from --max-memory
    denoiser: str = "UNet"  # what the plan line calls the rows' model
    vae_scale: int = 8  # pixels per latent (the toys' VAEs: 2)
    hardening: tuple[int, int] = (0, 0)  # attack steps before training, rows with gradients in each

    def line(self, method: str) -> str:
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        side = self.resolution // self.vae_scale
        rows = self.denoiser
        return (f"plan: {method} on {self.family_name}, {self.resolution} px ({side}x{side} latents), {dtype} weights "
                f"+ fp32 LoRA, batch {self.batch}: {self.steps} steps x {self.grad_rows} {rows} rows with gradients "
                f"+ {self.nograd_rows} without; "
                + (f"hardening {self.hardening[0]} attack steps x {self.hardening[1]} {rows} rows with gradients; "
                   if self.hardening[0] else "")
                + f"{self.ref_images} reference images x {self.ref_steps} denoising steps; "
                f"gradient checkpointing {'on' if self.checkpointing else 'off'}; expected peak "
                f"{self.estimate.device_total(self.device) / GIB:.1f} GiB of {self.budget / GIB:.1f} GiB "
                f"{'allowed' if self.capped else 'free'} on {self.device.type}"
                + ("; the hardening needs a GPU to be practical at this size (its attack steps took ~7 of an "
                   "SD 1.5-sized 256 px run's 11 min on one CPU thread); --fast skips it"
                   if self.hardening[0] and self.device.type == "cpu" and self.family != TOY_FAMILY else ""))



def make_plan(facts: ModelFacts, device: torch.device, *, precision: str, resolution: int | None, batch: int | None,
              ref_images: int | None, checkpointing: bool | None, rows, steps: int, ref_steps: int,
              max_memory_gib: float | None, loaded: bool, method_n_refs: int, user_n_refs: bool,
              hardening=lambda b: (0, 0)) -> RunPlan:
    """Resolve the family defaults for what the user left open and check that the run fits.

    rows(batch) -> (UNet rows with gradients, rows without) per step. hardening(batch) -> (attack steps, rows
    with gradients in each) run before training (the memory counts the larger of the two). method_n_refs: the method's
    n_refs; user_n_refs: the user set it (--set n_refs=N), so the family default does not override it.
    Raises PatchforgeError (one line, with the estimate) when the run cannot fit."""
    defaults = release_defaults(facts.family_name)
    dtype = choose_dtype(precision, facts.family, device)
    res = resolution or defaults.resolution or facts.native
    check_resolution(res, facts)
    b = batch or (defaults.batch_gpu if device.type == "cuda" else defaults.batch_cpu)
    if ref_images:
        n_refs = ref_images
    elif user_n_refs or defaults.ref_images is None:
        n_refs = method_n_refs
    else:
        n_refs = defaults.ref_images
    grad_rows, nograd_rows = rows(b)
    attack = hardening(b)
    grad_rows = max(grad_rows, attack[1] if attack[0] else 0)
    budget = int(max_memory_gib * GIB) if max_memory_gib else available_memory(device)
    cpu_steps = steps if device.type == "cpu" else 0
    fits_without = estimate(facts, dtype, res, grad_rows, False, loaded, cpu_steps).device_total(device) <= budget
    ck = checkpointing if checkpointing is not None else not fits_without
    est = estimate(facts, dtype, res, grad_rows, ck, loaded, cpu_steps)
    plan = RunPlan(facts.family, facts.family_name, dtype, res, b, n_refs, ref_steps, ck, grad_rows, nograd_rows,
                   steps, est, budget, device, bool(max_memory_gib),
                   "UNet" if "block_out_channels" in facts.denoiser else "transformer", facts.vae_scale, attack)
    if est.device_total(device) > budget:
        where = "allowed by --max-memory" if max_memory_gib else f"free on this {device.type}"
        raise PatchforgeError(
            f"this run does not fit: it needs about {est.device_total(device) / GIB:.1f} GiB ({est.parts()}) but "
            f"{budget / GIB:.1f} GiB are {where}; lower --resolution (now {res}) or --batch (now {b})"
            + ("" if ck else ", add --gradient-checkpointing")
            + (", or use --precision bf16" if dtype == torch.float32 else ""))
    return plan
