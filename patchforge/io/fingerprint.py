"""Which base model a pipeline is, and whether a patch fits it: the fingerprint a patch records when it is
saved (family, an architecture hash, hashes of the weights) and the check a load makes against it."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..backbones import for_pipe
from ..errors import BaseModelMismatch, one_line
from .patch_format import (K_BASE_ARCH, K_BASE_FAMILY, K_BASE_ID, K_BASE_WEIGHTS, K_BASE_WEIGHTS_V2, K_PREDICTION,
                           TEXT_PREFIX, Patch, base_label)

SAMPLE_PER_TENSOR = 4096  # values per tensor in the v2 weights fingerprint


def base_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) in named_modules order, without going into PEFT's adapter containers (lora_A,
    lora_B, lora_dropout, ...: one module per loaded adapter in every LoRA layer), so the walk costs
    the same with 1 or 50 adapters loaded. LoRA layers themselves and their base layers are in it."""
    out, seen = [], set()

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None and not name.startswith("lora_"):
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out


def base_parameters(model: torch.nn.Module):
    """Base parameters under names that do not depend on LoRA wrapping or the transformers version."""
    seen = set()
    for prefix, module in base_modules(model):
        for pname, p in module._parameters.items():
            name = f"{prefix}.{pname}" if prefix else pname
            if p is None or id(p) in seen or "lora_" in name:
                continue
            seen.add(id(p))
            yield name.replace(".base_layer.", ".").removeprefix(TEXT_PREFIX), p


def base_fingerprint(pipe, legacy: bool = True) -> dict[str, str]:
    """Which base a pipeline is: a readable family, a hash of its architecture (parameter names and
    shapes of the denoiser and text encoders, in the family's component order) and hashes of its
    weights: v2 hashes sign bits, so fp32, fp16 and bf16 copies of one checkpoint agree (the legacy
    hash rounds to float16: fp32 and fp16 only).

    `base_weights_v2` hashes a strided sample of every tensor: up to SAMPLE_PER_TENSOR values, every
    s-th element with s odd (so both halves of any alternating pattern are in it) and a starting
    offset drawn from the tensor's own content. An edit that touches more than a sliver of a tensor
    changes it; keeping it while changing the weights takes deliberate work (it is a guard against
    wrong bases, not a signature). `base_weights` is the older 16-values-per-tensor hash, kept so
    patches written before v2 still check (and for cache keys); legacy=False leaves it out (half the
    work: a load needs it only for a patch that records no v2 hash)."""
    arch, old, weights = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for comp in for_pipe(pipe).components:  # the family's own order: other families never change a hash
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        arch.update(f"{comp}:{type(model).__name__};".encode())
        for name, p in sorted(base_parameters(model), key=lambda t: t[0]):
            arch.update(f"{name}{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            if legacy:
                old.update(_legacy_sample(flat))
            weights.update(f"{name};".encode())
            weights.update(_strided_sample(flat))
    scheduler = getattr(pipe, "scheduler", None)
    prediction = (getattr(for_pipe(pipe), "PREDICTION", None)
                  or getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon")
    fp = {K_BASE_ID: _model_id(pipe), K_BASE_FAMILY: _family(pipe), K_BASE_ARCH: arch.hexdigest()[:16],
          K_BASE_WEIGHTS: old.hexdigest()[:16], K_BASE_WEIGHTS_V2: weights.hexdigest()[:32], K_PREDICTION: prediction}
    if not legacy:
        del fp[K_BASE_WEIGHTS]
    return fp


def _legacy_sample(flat: torch.Tensor) -> bytes:
    # integer arithmetic: a float32 linspace rounds past the end of tensors over 2^24 elements
    k = min(16, flat.numel())
    idx = (torch.arange(k, device=flat.device) * (flat.numel() - 1)) // max(k - 1, 1)
    return flat[idx].to(torch.float16).cpu().numpy().tobytes()


def _strided_sample(flat: torch.Tensor) -> bytes:
    # Sign bits only: rounding to fp16 or bf16 never changes a sign bit (an underflow keeps it, as -0.0),
    # so fp32, fp16 and bf16 copies of one checkpoint give the same hash (a patch trained in bf16 checks
    # against an fp16 pipeline), while another checkpoint or a fine-tune flips many of the sampled signs.
    n = flat.numel()
    if n > SAMPLE_PER_TENSOR:
        stride = -(-n // SAMPLE_PER_TENSOR) | 1  # odd
        head = (torch.arange(64, device=flat.device) * (n - 1)) // 63
        offset = int.from_bytes(hashlib.sha256(_sign_bits(flat[head])).digest()[:8], "little") % stride
        flat = flat[offset::stride]
    return _sign_bits(flat)


def _sign_bits(values: torch.Tensor) -> bytes:
    return np.packbits(torch.signbit(values.detach()).cpu().numpy()).tobytes()


def _model_id(pipe) -> str:
    from ..core.pipeline_loading import public_model_id

    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    return public_model_id(name) if name else "unknown"


def _family(pipe) -> str:
    return for_pipe(pipe).family_name()


def model_key(pipe) -> str:
    """A short stable id of the base weights: reference images and Fisher are cached under it."""
    return base_fingerprint(pipe)[K_BASE_WEIGHTS].split(":")[-1][:16]


def check_base(patch: Patch, pipe, strict: bool = False, fingerprint: dict | None = None) -> str | None:
    """Raise BaseModelMismatch if the patch was made for another architecture (or does not say which);
    for another checkpoint of the same architecture return a warning text (raise with strict=True)."""
    fp = fingerprint or base_fingerprint(pipe)
    md, where = patch.metadata, patch.path or "the patch"
    arch = md.get(K_BASE_ARCH, "")
    if not arch:
        raise BaseModelMismatch(f"{where} records no base architecture, so nothing says it fits this pipeline: "
                                f"ask its author for a patch saved by patchforge")
    if arch != fp[K_BASE_ARCH]:
        raise BaseModelMismatch(
            f"{where} was made for {base_label(md)} (architecture {one_line(arch, 20)}) but this pipeline is "
            f"{base_label(fp)} (architecture {fp[K_BASE_ARCH]}): load it on its own base model")
    key = K_BASE_WEIGHTS_V2 if md.get(K_BASE_WEIGHTS_V2) else K_BASE_WEIGHTS  # patches from before v2: the old hash
    if key not in fp:
        fp = base_fingerprint(pipe)
    if md.get(key) != fp[key]:
        other = "other weights (a fine-tune?)" if md.get(key) else "weights the patch records no fingerprint of"
        text = (f"{where} was made for '{one_line(md.get(K_BASE_ID, '?'))}' and this pipeline "
                f"('{one_line(fp[K_BASE_ID])}') "
                f"has the same architecture but {other}: the erasure may be weaker")
        if strict:
            raise BaseModelMismatch(text + "; pass strict=False to load it anyway")
        return text
    return None
