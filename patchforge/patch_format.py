"""Forget patch files: one safetensors file a plain `pipe.load_lora_weights(folder)` also loads.

Layout (spec in docs/patch-format.md):
  tensors   `{component}.{module}.lora_A.weight` / `.lora_B.weight`, component in unet / text_encoder /
            text_encoder_2; text-encoder modules in canonical `text_model.encoder...` form.
  metadata  `format: pt`, diffusers' `lora_adapter_metadata` (JSON of `{component}.{LoraConfig field}`,
            so rank and alpha reload exactly) and `patchforge.*` keys (concept, method, base, ...).

This module only reads, writes, validates and merges files. Putting patches into pipelines is
loading.py; the Hub is hub.py; other formats are export.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .backbones import all_components, for_pipe, text_components
from .errors import BaseModelMismatch, PatchFormatError, PatchforgeError

FORMAT_VERSION = "1"
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a folder
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMPONENTS = all_components()  # every family's LoRA-carrying components (patchforge.backbones)
TEXT_COMPONENTS = text_components()
TEXT_PREFIX = "text_model."  # canonical text-encoder module prefix (transformers < 5 layout)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses larger headers

# patchforge.* metadata keys; every value is a string (safetensors metadata is str -> str)
K_VERSION = "patchforge.format_version"
K_CONCEPT = "patchforge.concept"
K_CONCEPTS = "patchforge.concepts"  # JSON list of {"kind", "name", "to"}: what eval and attacks read back
K_SEED = "patchforge.seed"
K_METHOD = "patchforge.method"
K_HPARAMS = "patchforge.hyperparameters"
K_BASE_ID = "patchforge.base_model"
K_BASE_FAMILY = "patchforge.base_family"
K_BASE_ARCH = "patchforge.base_architecture"
K_BASE_WEIGHTS = "patchforge.base_weights"
K_PREDICTION = "patchforge.base_prediction_type"
K_TARGETS = "patchforge.targets"
K_SECONDS = "patchforge.training_seconds"
K_DEVICE = "patchforge.device"
K_EVAL = "patchforge.eval"
K_MERGED = "patchforge.merged_from"


@dataclass
class Patch:
    """A forget patch in memory. `state_dicts[component]` maps `{module}.lora_A.weight` (canonical
    module names) to tensors; `lora_configs[component]` holds LoraConfig keyword arguments."""
    state_dicts: dict[str, dict[str, torch.Tensor]]
    lora_configs: dict[str, dict]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def concept(self) -> str:
        return self.metadata.get(K_CONCEPT, "")

    @property
    def method(self) -> str:
        return self.metadata.get(K_METHOD, "")

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.state_dicts.get(c)]

    def modules(self, component: str) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.state_dicts[component]})

    def scale(self, component: str, module: str) -> float:
        """The factor PEFT puts in front of B @ A for this module (alpha / r, or alpha / sqrt(r))."""
        cfg = self.lora_configs[component]
        r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def delta(self, component: str, module: str) -> torch.Tensor:
        """The weight change this patch makes to one module at weight 1: scale * B @ A."""
        sd = self.state_dicts[component]
        a, b = sd[f"{module}.lora_A.weight"].float(), sd[f"{module}.lora_B.weight"].float()
        return self.scale(component, module) * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{c}.{k}": v for c in self.components for k, v in self.state_dicts[c].items()}


def pattern_value(pattern: dict, module: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as module-name suffixes
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


# ----------------------------------------------------------------------------- base fingerprint

def _params(model: torch.nn.Module):
    """Base parameters under names that do not depend on LoRA wrapping or the transformers version."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".").removeprefix(TEXT_PREFIX)
        yield name, p


def base_fingerprint(pipe) -> dict[str, str]:
    """Which base a pipeline is: a readable family, a hash of its architecture (parameter names and
    shapes of UNet and text encoders) and a hash of its weights (16 values sampled from every
    tensor, rounded to float16 so fp32 and fp16 copies of one checkpoint agree)."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        arch.update(f"{comp}:{type(model).__name__};".encode())
        for name, p in sorted(_params(model), key=lambda t: t[0]):
            arch.update(f"{name}{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            # integer arithmetic: a float32 linspace rounds past the end of tensors over 2^24 elements
            k = min(16, flat.numel())
            idx = (torch.arange(k, device=flat.device) * (flat.numel() - 1)) // max(k - 1, 1)
            weights.update(flat[idx].to(torch.float16).cpu().numpy().tobytes())
    scheduler = getattr(pipe, "scheduler", None)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
    return {K_BASE_ID: _model_id(pipe), K_BASE_FAMILY: _family(pipe), K_BASE_ARCH: arch.hexdigest()[:16],
            K_BASE_WEIGHTS: weights.hexdigest()[:16], K_PREDICTION: prediction}


def _model_id(pipe) -> str:
    from .pipeline_loading import model_id

    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    return model_id(name) if name else "unknown"


def _family(pipe) -> str:
    return for_pipe(pipe).family_name()


def model_key(pipe) -> str:
    """A short stable id of the base weights: reference images and Fisher are cached under it."""
    return base_fingerprint(pipe)[K_BASE_WEIGHTS].split(":")[-1][:16]


def family_of(metadata: dict[str, str]) -> str:
    return f"{metadata.get(K_BASE_FAMILY, '?')} '{metadata.get(K_BASE_ID, '?')}'"


def check_base(patch: Patch, pipe, strict: bool = False, fingerprint: dict | None = None) -> str | None:
    """Raise BaseModelMismatch if the patch was made for another architecture; for another checkpoint
    of the same architecture return a warning text (raise with strict=True)."""
    fp = fingerprint or base_fingerprint(pipe)
    md, where = patch.metadata, patch.path or "the patch"
    if md.get(K_BASE_ARCH) and md[K_BASE_ARCH] != fp[K_BASE_ARCH]:
        raise BaseModelMismatch(
            f"{where} was made for {family_of(md)} (architecture {md[K_BASE_ARCH]}) but this pipeline is "
            f"{family_of(fp)} (architecture {fp[K_BASE_ARCH]}): load it on its own base model")
    if md.get(K_BASE_WEIGHTS) and md[K_BASE_WEIGHTS] != fp[K_BASE_WEIGHTS]:
        text = (f"{where} was made for '{md.get(K_BASE_ID, '?')}' and this pipeline ('{fp[K_BASE_ID]}') has the same "
                f"architecture but other weights (a fine-tune?): the erasure may be weaker")
        if strict:
            raise BaseModelMismatch(text + "; pass strict=False to load it anyway")
        return text
    return None


# ----------------------------------------------------------------------------- writing

def lora_config_dict(config) -> dict:
    """LoraConfig -> JSON-able dict, as diffusers stores it (sets become sorted lists)."""
    out = {}
    for k, v in config.to_dict().items():
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        out[k] = v.value if hasattr(v, "value") and not isinstance(v, (int, float, str)) else v
    return json.loads(json.dumps(out, default=str))


def save_patch_from_pipeline(pipe, path, *, adapter_name: str, metadata: dict[str, str]) -> Path:
    """Write adapter `adapter_name` of the pipeline's denoiser and text encoders as a forget patch.

    `path` is a .safetensors file or a folder (then DEFAULT_WEIGHT_NAME inside it). `metadata` holds
    the trainer's patchforge.* keys; the base fingerprint and format keys are added here."""
    from peft.utils import get_peft_model_state_dict

    state_dicts, configs = {}, {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None or adapter_name not in (getattr(model, "peft_config", None) or {}):
            continue
        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        if comp in TEXT_COMPONENTS:
            sd = {k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in sd.items()}
        state_dicts[comp] = {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}
        configs[comp] = lora_config_dict(model.peft_config[adapter_name])
    if not state_dicts:
        raise PatchforgeError(f"no component of the pipeline has a LoRA adapter named '{adapter_name}': "
                              f"add one with component.add_adapter(LoraConfig(...), adapter_name='{adapter_name}')")
    md = {k: str(v) for k, v in metadata.items()}
    md.update(base_fingerprint(pipe))
    md.setdefault(K_TARGETS, json.dumps({c: configs[c].get("target_modules") for c in configs}, sort_keys=True))
    return write_patch(Patch(state_dicts, configs, md), path)


def write_patch(patch: Patch, path) -> Path:
    """Validate and write atomically: a reader never sees a half-written patch."""
    import safetensors.torch

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / DEFAULT_WEIGHT_NAME
    validate(patch)
    md = {k: str(v) for k, v in patch.metadata.items() if not k.startswith("patchforge.") or v is not None}
    md[K_VERSION] = FORMAT_VERSION
    md["format"] = "pt"
    lora_md = {f"{c}.{k}": v for c in patch.components for k, v in patch.lora_configs[c].items()}
    md[LORA_METADATA_KEY] = json.dumps(lora_md, indent=2, sort_keys=True)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(patch.flat_state_dict(), str(tmp), metadata=md)
    patch.path, patch.metadata = path, md
    return path


# ----------------------------------------------------------------------------- reading

def read_patch(path) -> Patch:
    """Read and validate a patch file. Anything wrong -> PatchFormatError with what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_WEIGHT_NAME
    if not path.is_file():
        raise PatchFormatError(f"no patch file at '{path}': give the .safetensors file or the folder holding it")
    return parse_patch(path.read_bytes(), path)


def parse_patch(data: bytes, path: Path | None = None) -> Patch:
    where = f"'{path}'" if path else "the patch"
    metadata, tensors = _parse_safetensors(data, where)
    if K_VERSION not in metadata:
        raise PatchFormatError(f"{where} is a safetensors file but not a forget patch (no patchforge metadata): "
                               f"load ordinary LoRAs with pipe.load_lora_weights")
    if metadata[K_VERSION] != FORMAT_VERSION:
        raise PatchFormatError(f"{where} has patch format {metadata[K_VERSION]!r}, this patchforge reads "
                               f"{FORMAT_VERSION!r}: upgrade patchforge")
    try:
        lora_md = json.loads(metadata.get(LORA_METADATA_KEY) or "{}")
        assert isinstance(lora_md, dict)
    except (ValueError, AssertionError):
        raise PatchFormatError(f"{where} has unreadable '{LORA_METADATA_KEY}' metadata: re-save the patch") from None
    state_dicts: dict[str, dict] = {}
    for key, value in tensors.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS or not rest:
            raise PatchFormatError(f"{where} has tensor '{key}' outside {'/'.join(COMPONENTS)}: "
                                   f"not a forget patch, or a damaged one")
        state_dicts.setdefault(comp, {})[rest] = value
    configs = {}
    for comp in state_dicts:
        cfg = {k.removeprefix(comp + "."): v for k, v in lora_md.items() if k.startswith(comp + ".")}
        if not cfg:
            raise PatchFormatError(f"{where} has {comp} weights but no LoRA config for them in "
                                   f"'{LORA_METADATA_KEY}': re-save the patch with patchforge")
        configs[comp] = cfg
    patch = Patch(state_dicts, configs, metadata, path)
    validate(patch, where)
    return patch


def _parse_safetensors(data: bytes, where: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    import safetensors.torch

    # A safetensors file is an 8-byte header length, then the JSON header. Sniff pickles only when that
    # does not hold: a real header length can start with 0x80 or spell "PK" (one patch in 256 did).
    looks_safetensors = len(data) >= 10 and data[8:9] == b"{"
    if not looks_safetensors and (data[:2] == b"PK" or data[:1] == b"\x80"):  # torch.save zip / raw pickle
        raise PatchFormatError(f"{where} is a pickle (torch.save) file; patchforge never unpickles: "
                               f"ask for the .safetensors version")
    if len(data) < 10:
        raise PatchFormatError(f"{where} is empty or truncated ({len(data)} bytes): download or copy it again")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise PatchFormatError(f"{where} is truncated or not safetensors (header length {n}, file "
                               f"{len(data)} bytes): download or copy it again")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        assert isinstance(header, dict)
        metadata = header.get("__metadata__") or {}
        assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    except (ValueError, UnicodeDecodeError, AssertionError):
        raise PatchFormatError(f"{where} has a corrupt safetensors header: download or copy it again") from None
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # SafetensorError, ValueError, ...: all mean a damaged file
        msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise PatchFormatError(f"{where} is corrupt or truncated ({msg}): download or copy it again") from None
    return metadata, tensors


def validate(patch: Patch, where: str = "the patch") -> None:
    """Every module has a matching lora_A / lora_B pair of float tensors with consistent ranks."""
    if not patch.components:
        raise PatchFormatError(f"{where} holds no LoRA weights: re-train or re-save it")
    for comp in patch.components:
        sd = patch.state_dicts[comp]
        for key in sd:
            if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
                raise PatchFormatError(f"{where} has unexpected tensor '{comp}.{key}' (only PEFT lora_A/lora_B "
                                       f"weights allowed; DoRA and biases are not supported)")
        for module in patch.modules(comp):
            a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
            if a is None or b is None:
                raise PatchFormatError(f"{where} lacks the lora_{'A' if a is None else 'B'} weight of "
                                       f"{comp}.{module}: the file is incomplete, re-save it")
            if not (a.is_floating_point() and b.is_floating_point()) or a.dim() not in (2, 4) or b.dim() != a.dim() \
                    or a.shape[0] != b.shape[1] or a.shape[0] == 0 or (a.dim() == 4 and b.shape[2:] != (1, 1)):
                raise PatchFormatError(f"{where} has inconsistent LoRA shapes at {comp}.{module} (A {tuple(a.shape)},"
                                       f" B {tuple(b.shape)} {a.dtype}): the file is damaged, re-save it")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise PatchFormatError(f"{where} has NaN/inf weights at {comp}.{module}: the training diverged")
        if patch.lora_configs.get(comp, {}).get("use_dora"):
            raise PatchFormatError(f"{where} is a DoRA adapter; forget patches are plain LoRA")


# ----------------------------------------------------------------------------- merging

def merge_patches(patches: list[Patch], weights: list[float] | None = None) -> Patch:
    """One patch whose effect is exactly sum_i w_i * delta_i.

    Ranks are concatenated: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with each
    patch's scale s_i folded into B, so B @ A = sum_i w_i s_i B_i A_i and the merged adapter runs
    at scale 1 (alpha = r). Modules a patch does not touch get zero rows, keeping one rank for the
    whole component. Scaling A and B separately (or averaging them) would add cross terms."""
    if not patches:
        raise PatchforgeError("nothing to merge: give at least one patch")
    weights = [1.0] * len(patches) if weights is None else [float(w) for w in weights]
    if len(weights) != len(patches):
        raise PatchforgeError(f"{len(weights)} weights for {len(patches)} patches: give one weight per patch")
    arches = {p.metadata.get(K_BASE_ARCH) for p in patches}
    if len(arches - {None}) > 1:
        names = ", ".join(f"{p.path or '?'} ({family_of(p.metadata)})" for p in patches)
        raise BaseModelMismatch(f"these patches are for different base models and cannot be merged: {names}")
    state_dicts, configs = {}, {}
    for comp in COMPONENTS:
        members = [(p, w) for p, w in zip(patches, weights) if comp in p.components]
        if not members:
            continue
        ranks = [max(t.shape[0] for k, t in p.state_dicts[comp].items() if k.endswith("lora_A.weight"))
                 for p, _ in members]
        total = sum(ranks)
        modules = sorted({m for p, _ in members for m in p.modules(comp)})
        sd = {}
        for module in modules:
            # the module's shapes from any patch that has it; zero blocks where a patch is absent
            a0, b0 = next((p.state_dicts[comp][f"{module}.lora_A.weight"], p.state_dicts[comp][f"{module}.lora_B.weight"])
                          for p, _ in members if f"{module}.lora_A.weight" in p.state_dicts[comp])
            a_shape, b_shape = a0.shape[1:], (b0.shape[0], *b0.shape[2:])
            a_cat, b_cat = [], []
            for (p, w), r in zip(members, ranks):
                a = p.state_dicts[comp].get(f"{module}.lora_A.weight")
                if a is None:
                    a_cat.append(torch.zeros(r, *a_shape))
                    b_cat.append(torch.zeros(b_shape[0], r, *b_shape[1:]))
                    continue
                b = p.state_dicts[comp][f"{module}.lora_B.weight"]
                pad = r - a.shape[0]
                a_cat.append(torch.cat([a.float(), torch.zeros(pad, *a.shape[1:])]))
                b_cat.append(torch.cat([b.float() * (w * p.scale(comp, module)), torch.zeros(b.shape[0], pad,
                                                                                           *b.shape[2:])], dim=1))
            sd[f"{module}.lora_A.weight"] = torch.cat(a_cat).contiguous()
            sd[f"{module}.lora_B.weight"] = torch.cat(b_cat, dim=1).contiguous()
        cfg = dict(members[0][0].lora_configs[comp])
        cfg.update(r=total, lora_alpha=total, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                   target_modules=[m.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS else m for m in modules])
        state_dicts[comp], configs[comp] = sd, cfg
    first = patches[0].metadata
    md = {k: v for k, v in first.items() if k.startswith("patchforge.base")}
    md[K_CONCEPT] = "; ".join(p.concept for p in patches if p.concept)
    md[K_METHOD] = "merge"
    md[K_MERGED] = json.dumps([{"concept": p.concept, "method": p.method, "weight": w,
                                "file": p.path.name if p.path else None} for p, w in zip(patches, weights)])
    md[K_TARGETS] = json.dumps({c: configs[c]["target_modules"] for c in configs}, sort_keys=True)
    return Patch(state_dicts, configs, md)


# ----------------------------------------------------------------------------- CLI: patchforge merge

def run_merge(args) -> int:
    merged = merge_patches([read_patch(p) for p in args.patches], args.weights)
    out = write_patch(merged, args.output)
    print(f"merged {len(args.patches)} patches ({merged.concept}) -> {out}")
    return 0
