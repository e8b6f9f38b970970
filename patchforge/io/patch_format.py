"""Forget patch files: one safetensors file a plain `pipe.load_lora_weights(folder)` also loads.

Layout (spec in docs/patch-format.md):
  tensors   `{component}.{module}.lora_A.weight` / `.lora_B.weight`, component in unet / text_encoder /
            text_encoder_2 (SD 1.x / 2.x / XL) or transformer / text_encoder / text_encoder_2 (SD3, FLUX),
            the components of one family; text-encoder modules in canonical `text_model.encoder...` form.
  metadata  `format: pt`, diffusers' `lora_adapter_metadata` (JSON of `{component}.{LoraConfig field}`,
            so rank and alpha reload exactly) and `patchforge.*` keys (concept, method, base, ...).

This module only reads, writes, validates and merges files. Which base a pipeline is (and whether a patch
fits it) is fingerprint.py; a pipeline's trained adapter becomes a file in saving.py; putting patches into
pipelines is loading.py; the Hub is hub.py; other formats are export.py and kohya.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.atomic import atomic_path
from ..backbones import all_components, family_components, text_components
from ..errors import BaseModelMismatch, PatchFormatError, PatchforgeError, one_line  # noqa: F401  (one_line: re-exported)

FORMAT_VERSION = "1"
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a folder
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMPONENTS = all_components()  # every family's LoRA-carrying components (patchforge.backbones)
TEXT_COMPONENTS = text_components()
TEXT_PREFIX = "text_model."  # canonical text-encoder module prefix (transformers < 5 layout)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses larger headers
MAX_PATCH_BYTES = 2**30  # a rank-64 SDXL UNet + text-encoder LoRA in fp32 is ~700 MiB; forget patches are far smaller
MAX_TENSORS = 50_000
MAX_RANK = 4096
MAX_ALPHA = 1e6
MAX_DELTA_NORM = 1e4  # |scale * B @ A|_F of one module; the loader also holds it to 10x the layer's own norm
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# rank_pattern / alpha_pattern keys: module names, plain or re.escape'd (no classes, groups or repeats)
PATTERN_KEY = re.compile(r"(?:[A-Za-z0-9_]|\\[^A-Za-z0-9\s]|\.)+")
MAX_PATTERN_KEY = 512
# LoRA config keys a patch file may set, and bookkeeping keys that change nothing at inference
LORA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
LORA_IGNORED_KEYS = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                               "revision", "inference_mode", "lora_dropout", "fan_in_fan_out", "megatron_core",
                               "qalora_group_size"})

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
K_BASE_WEIGHTS_V2 = "patchforge.base_weights_v2"
K_BASE_REPO_ID = "patchforge.base_repo_id"  # the base's Hub repo id, only when the base came from the Hub
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
    digest: str = ""  # SHA-256 of the tensor bytes as read (spots the same patch loaded twice)

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
        r, alpha = module_rank_alpha(cfg, peft_name(component, module))
        return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def delta(self, component: str, module: str) -> torch.Tensor:
        """The weight change this patch makes to one module at weight 1: scale * B @ A."""
        sd = self.state_dicts[component]
        a, b = sd[f"{module}.lora_A.weight"].float(), sd[f"{module}.lora_B.weight"].float()
        return self.scale(component, module) * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{c}.{k}": v for c in self.components for k, v in self.state_dicts[c].items()}


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that, read as a regex, matches the
    end of the module's name at a dot. `name` is the module as PEFT sees it (peft_name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_rank_alpha(cfg: dict, name: str) -> tuple:
    """(r, lora_alpha) PEFT gives module `name` under this config (LoraConfig's defaults: 8 and 8)."""
    return (pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8)),
            pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8)))


def peft_name(comp: str, module: str) -> str:
    """A patch's module name as PEFT sees it when diffusers loads the file: text encoders without the
    text_model. wrapper (transformers >= 5 has none; diffusers strips it)."""
    return module.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS else module


def unit_scale(patch: Patch) -> Patch:
    """The same patch with each module's scale folded into its B (fp32), so alpha = rank everywhere:
    every tool then applies the same delta, whether it reads lora_adapter_metadata (diffusers, PEFT),
    .alpha tensors (kohya, A1111) or neither and applies scale 1 (ComfyUI for PEFT keys)."""
    state_dicts, configs = {}, {}
    for comp in patch.components:
        sd = dict(patch.state_dicts[comp])
        ranks = {}
        for module in patch.modules(comp):
            scale = patch.scale(comp, module)
            if scale != 1.0:
                sd[f"{module}.lora_B.weight"] = (sd[f"{module}.lora_B.weight"].float() * scale).contiguous()
            ranks[re.escape(peft_name(comp, module))] = sd[f"{module}.lora_A.weight"].shape[0]
        r = patch.lora_configs[comp].get("r", 8)
        configs[comp] = {**patch.lora_configs[comp], "lora_alpha": r, "use_rslora": False,
                         "alpha_pattern": {k: v for k, v in ranks.items() if v != r}}
        state_dicts[comp] = sd
    return Patch(state_dicts, configs, dict(patch.metadata))


def base_label(metadata: dict[str, str]) -> str:
    """The base a patch (or a fingerprint) names, for messages: family and model id, one line each."""
    return f"{one_line(metadata.get(K_BASE_FAMILY, '?'))} '{one_line(metadata.get(K_BASE_ID, '?'))}'"


def public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A patch's metadata as it may leave the machine (push, export, cards, reports): the base is named
    only by its Hub repo id or the toy's name. Files written before the base was recorded that way
    carried the local folder's path in patchforge.base_model: it is replaced here."""
    from ..core.pipeline_loading import LOCAL_MODEL_ID, TOY_MODEL_ID, TOY_SD3_ID

    out = dict(metadata)
    base = out.get(K_BASE_ID)
    if base is not None and base not in ("unknown", TOY_MODEL_ID, TOY_SD3_ID):
        out[K_BASE_ID] = metadata.get(K_BASE_REPO_ID) or LOCAL_MODEL_ID
    return out


# ----------------------------------------------------------------------------- writing

def write_patch(patch: Patch, path) -> Path:
    """Validate and write atomically: a reader never sees a half-written patch."""
    import safetensors.torch

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / DEFAULT_WEIGHT_NAME
    # the written config is the allow-listed one: plain diffusers users get no PEFT option we refuse
    patch.lora_configs = {c: clean_lora_config(patch.lora_configs[c], c, {k: (v.shape or [0])[0] for k, v in
                                                                         patch.state_dicts[c].items()})
                          for c in patch.components}
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

def read_patch(path, max_bytes: int | None = None) -> Patch:
    """Read and validate a patch file. Anything wrong -> PatchFormatError with what to do.

    The file is checked before its tensors are read: its size (at most `max_bytes`, default
    MAX_PATCH_BYTES), the header (dtypes, shapes and byte ranges that fit the file) and the patch
    metadata. Then the tensor bytes are read once, into one buffer the tensors share."""
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_WEIGHT_NAME
    if not path.is_file():
        raise PatchFormatError(f"no patch file at '{path}': give the .safetensors file or the folder holding it")
    where, size = f"'{path}'", path.stat().st_size
    _check_size(size, max_bytes, where)
    with open(path, "rb") as f:
        head = f.read(min(size, 10))
        n = _header_length(head, size, where)
        f.seek(8)
        header = _parse_header(f.read(n), size - 8 - n, where)
        layout = _layout(header, where)  # metadata, LoRA configs, ranks: all before a tensor byte is read
        buf = bytearray(size - 8 - n)
        if f.readinto(buf) != len(buf):
            raise PatchFormatError(f"{where} changed while it was read: copy it again")
    return _build(layout, buf, path, where)


def parse_patch(data: bytes, path: Path | None = None, max_bytes: int | None = None) -> Patch:
    """read_patch for bytes already in memory (same checks)."""
    where = f"'{path}'" if path else "the patch"
    _check_size(len(data), max_bytes, where)
    n = _header_length(data[:10], len(data), where)
    layout = _layout(_parse_header(data[8:8 + n], len(data) - 8 - n, where), where)
    return _build(layout, bytearray(data[8 + n:]), path, where)


def _check_size(size: int, max_bytes: int | None, where: str) -> None:
    limit = MAX_PATCH_BYTES if max_bytes is None else max_bytes
    if size > limit:
        raise PatchFormatError(f"{where} is {size / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB limit for a "
                               f"forget patch: pass max_bytes= if you trust it")


def _header_length(head: bytes, size: int, where: str) -> int:
    # A safetensors file is an 8-byte header length, then the JSON header. Sniff pickles only when that
    # does not hold: a real header length can start with 0x80 or spell "PK" (one patch in 256 did).
    looks_safetensors = len(head) >= 10 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch.save zip / raw pickle
        raise PatchFormatError(f"{where} is a pickle (torch.save) file; patchforge never unpickles: "
                               f"ask for the .safetensors version")
    if size < 10:
        raise PatchFormatError(f"{where} is empty or truncated ({size} bytes): download or copy it again")
    (n,) = struct.unpack("<Q", head[:8])
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise PatchFormatError(f"{where} is truncated or not safetensors (header length {n}, file "
                               f"{size} bytes): download or copy it again")
    return n


def _parse_header(raw: bytes, data_len: int, where: str) -> dict:
    """The JSON header, checked entry by entry against the data that follows it: only float dtypes
    a LoRA uses, shapes of at most 4 dims, byte ranges that match the shapes, tile the data exactly
    and never overlap. Nothing is allocated from a declared size that the file does not back."""
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
        metadata = header.pop("__metadata__", None) or {}
        assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    except (ValueError, UnicodeDecodeError, AssertionError, RecursionError):
        raise PatchFormatError(f"{where} has a corrupt safetensors header: download or copy it again") from None
    if len(header) > MAX_TENSORS:
        raise PatchFormatError(f"{where} holds {len(header)} tensors, more than a forget patch ever has "
                               f"({MAX_TENSORS})")
    spans = []
    for key, entry in header.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
              and isinstance(entry.get("data_offsets"), list))
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and len(shape) <= 4 and all(type(d) is int and 0 <= d < 2**40 for d in shape) \
            and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_len
        if not ok:
            raise PatchFormatError(f"{where} has a corrupt header entry for '{one_line(key, 80)}': download or copy it "
                                   "again")
        if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
            raise PatchFormatError(f"{where} holds tensor '{one_line(key, 80)}' of dtype "
                                   f"{one_line(entry.get('dtype'), 16)}; forget patches hold F16, BF16, F32 or F64 "
                                   f"LoRA weights")
        if math.prod(shape) * DTYPES[entry["dtype"]].itemsize != offsets[1] - offsets[0]:
            raise PatchFormatError(f"{where}: tensor '{one_line(key, 80)}' has shape {shape} but "
                                   f"{offsets[1] - offsets[0]} bytes: the file is damaged, download or copy it again")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise PatchFormatError(f"{where} has overlapping or gapped tensor data: the file is damaged")
        end = stop
    if end != data_len:
        raise PatchFormatError(f"{where} has {data_len - end} bytes after its tensors: truncated, padded or damaged")
    header["__metadata__"] = metadata
    return header


def _patch_metadata(header: dict, where: str) -> tuple[dict[str, str], dict]:
    metadata = header["__metadata__"]
    if K_VERSION not in metadata:
        raise PatchFormatError(f"{where} is a safetensors file but not a forget patch (no patchforge metadata): "
                               f"load ordinary LoRAs with pipe.load_lora_weights")
    if metadata[K_VERSION] != FORMAT_VERSION:
        raise PatchFormatError(f"{where} has patch format {metadata[K_VERSION][:16]!r}, this patchforge reads "
                               f"{FORMAT_VERSION!r}: upgrade patchforge")
    try:
        lora_md = json.loads(metadata.get(LORA_METADATA_KEY) or "{}")
        assert isinstance(lora_md, dict)
    except (ValueError, AssertionError, RecursionError):
        raise PatchFormatError(f"{where} has unreadable '{LORA_METADATA_KEY}' metadata: re-save the patch") from None
    return metadata, lora_md


def _layout(header: dict, where: str) -> tuple[dict, dict, dict]:
    """From the header alone: metadata, header entries per component, allow-listed LoRA configs."""
    metadata, lora_md = _patch_metadata(header, where)
    entries: dict[str, dict] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS or not rest:
            raise PatchFormatError(f"{where} has tensor '{one_line(key)}' outside {'/'.join(COMPONENTS)}: "
                                   f"not a forget patch, or a damaged one")
        entries.setdefault(comp, {})[rest] = entry
    configs = {}
    for comp, sd in entries.items():
        cfg = {k.removeprefix(comp + "."): v for k, v in lora_md.items() if k.startswith(comp + ".")}
        if not cfg:
            raise PatchFormatError(f"{where} has {comp} weights but no LoRA config for them in "
                                   f"'{LORA_METADATA_KEY}': re-save the patch with patchforge")
        ranks = {k: (e["shape"] or [0])[0] for k, e in sd.items()}
        configs[comp] = clean_lora_config(cfg, comp, ranks, where)
    return metadata, entries, configs


def _build(layout: tuple[dict, dict, dict], buf: bytearray, path, where: str) -> Patch:
    metadata, entries, configs = layout
    # views into the one buffer: little-endian data as safetensors stores it (a copy only when misaligned)
    data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    state_dicts = {}
    for comp, sd in entries.items():
        state_dicts[comp] = {}
        for key, entry in sd.items():
            begin, stop = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            raw = data[begin:stop]
            if begin % dtype.itemsize:
                raw = raw.clone()
            state_dicts[comp][key] = raw.view(dtype).reshape(entry["shape"])
    patch = Patch(state_dicts, configs, metadata, Path(path) if path else None, hashlib.sha256(buf).hexdigest())
    validate(patch, where)
    return patch


# ----------------------------------------------------------------------------- LoRA configs from files

def clean_lora_config(raw: dict, comp: str, ranks: dict, where: str = "the patch") -> dict:
    """The LoRA config a file may carry, rebuilt from an allow-list.

    A config from a file is code-like input: PEFT runs `init_lora_weights` ("pissa", "olora", ...
    rewrite the base weights in place), `modules_to_save` wraps base modules, DoRA, biases and
    layer replication change what the adapter computes. Only r, lora_alpha, target_modules,
    rank_pattern, alpha_pattern and use_rslora are kept; bookkeeping keys are dropped; any other
    key with a non-default value is refused. The declared ranks must equal the tensors' ranks."""
    cfg = {}
    for key, value in raw.items():
        if key in LORA_KEYS:
            cfg[key] = value
        elif key == "init_lora_weights":
            if value not in (True, False, "gaussian"):
                raise PatchFormatError(f"{where}: {comp} init_lora_weights={str(value)[:20]!r} would rewrite the base "
                                       f"model's weights; forget patches are plain LoRA")
        elif key not in LORA_IGNORED_KEYS and value not in (None, False, "none", [], {}, ""):
            raise PatchFormatError(f"{where}: {comp} LoRA option '{one_line(key, 40)}' = {one_line(repr(value), 40)} "
                                   "is not allowed in a forget patch (plain LoRA only: no DoRA, biases, "
                                   "modules_to_save, layer selection)")
    if not _is_count(cfg.get("r", 8)):
        raise PatchFormatError(f"{where}: {comp} rank r={str(cfg.get('r'))[:20]!r} is not a positive integer")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise PatchFormatError(f"{where}: {comp} {key} is not a mapping of module names")
        regex = next((k for k in pattern if not (len(k) <= MAX_PATTERN_KEY and PATTERN_KEY.fullmatch(k))), None)
        if regex is not None:
            raise PatchFormatError(f"{where}: {comp} {key} key {one_line(regex, 40)!r} is a regex, not a module name: "
                                   f"PEFT would apply it to modules this file does not list")
        cfg[key] = pattern
    if not all(_is_count(v) for v in cfg["rank_pattern"].values()):
        raise PatchFormatError(f"{where}: {comp} rank_pattern holds a rank that is not a positive integer")
    alphas = [cfg.get("lora_alpha", cfg.get("r", 8)), *cfg["alpha_pattern"].values()]
    if not all(_is_real(a) and 0 < a <= MAX_ALPHA for a in alphas):  # 0: a patch that does nothing; < 0: inverted
        raise PatchFormatError(f"{where}: {comp} lora_alpha / alpha_pattern must be numbers above 0 and at most "
                               f"{MAX_ALPHA:g}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise PatchFormatError(f"{where}: {comp} use_rslora is not true/false")
    targets = cfg.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or
                                    (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise PatchFormatError(f"{where}: {comp} target_modules is not a list of module names")
    # ranks: {tensor key: first dimension} (from the header when reading, from the tensors when writing)
    exact = {}
    for key, rank in ranks.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            declared, alpha = module_rank_alpha(cfg, peft_name(comp, module))
            if declared != rank:
                raise PatchFormatError(f"{where}: {comp}.{one_line(module)} declares rank {declared} but its tensors "
                                       f"have rank {rank}: the file is damaged or forged")
            exact[re.escape(peft_name(comp, module))] = (declared, alpha)
    # the same values, each pattern key one module's exact name: what PEFT applies, said without ambiguity
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    cfg["rank_pattern"] = {k: v[0] for k, v in sorted(exact.items()) if v[0] != r}
    cfg["alpha_pattern"] = {k: v[1] for k, v in sorted(exact.items()) if v[1] != alpha}
    return cfg


def _is_count(v) -> bool:
    return type(v) is int and 1 <= v <= MAX_RANK


def _is_real(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def peft_config_kwargs(patch: Patch, comp: str, flat_text: bool) -> dict:
    """The LoraConfig keyword arguments handed to diffusers/PEFT: exact module names as targets,
    each module's scale folded into its alpha (no rsLoRA, no regex patterns from the file), and
    init_lora_weights=False so PEFT never touches the base weights."""
    modules = patch.modules(comp)
    names = {m: (m.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS and flat_text else m) for m in modules}
    ranks = {m: patch.state_dicts[comp][f"{m}.lora_A.weight"].shape[0] for m in modules}
    alphas = {m: patch.scale(comp, m) * ranks[m] for m in modules}
    r0, a0 = ranks[modules[0]], alphas[modules[0]]
    # PEFT matches pattern keys as regexes: escape the exact names
    # one anchored alternation of the exact names: PEFT full-matches a string once per module (a long
    # list costs it a suffix search per module and per name)
    targets = "^(?:" + "|".join(re.escape(n) for n in sorted(names.values())) + ")$"
    return {"r": r0, "lora_alpha": a0, "target_modules": targets,
            "rank_pattern": {re.escape(names[m]): ranks[m] for m in modules if ranks[m] != r0},
            "alpha_pattern": {re.escape(names[m]): alphas[m] for m in modules if alphas[m] != a0},
            "use_rslora": False, "init_lora_weights": False}


def validate(patch: Patch, where: str = "the patch") -> None:
    """Every module has a matching lora_A / lora_B pair of float tensors with consistent ranks, finite
    values, and a weight change |scale * B @ A| that is finite and not absurdly large."""
    if not patch.components:
        raise PatchFormatError(f"{where} holds no LoRA weights: re-train or re-save it")
    if not any(set(patch.components) <= set(family) for family in family_components()):
        raise PatchFormatError(f"{where} holds {' + '.join(patch.components)} weights, which no model family has "
                               "together: not a forget patch, or a damaged one")
    for comp in patch.components:
        sd = patch.state_dicts[comp]
        for key in sd:
            if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
                raise PatchFormatError(f"{where} has unexpected tensor '{comp}.{one_line(key)}' (only PEFT "
                                       "lora_A/lora_B weights allowed; DoRA and biases are not supported)")
        for module in patch.modules(comp):
            a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
            if a is None or b is None:
                raise PatchFormatError(f"{where} lacks the lora_{'A' if a is None else 'B'} weight of "
                                       f"{comp}.{one_line(module)}: the file is incomplete, re-save it")
            if a.dtype not in DTYPES.values() or b.dtype not in DTYPES.values() or a.dim() not in (2, 4) \
                    or b.dim() != a.dim() or a.shape[0] != b.shape[1] or a.shape[0] == 0 or 0 in a.shape or \
                    0 in b.shape or (a.dim() == 4 and b.shape[2:] != (1, 1)):
                raise PatchFormatError(f"{where} has inconsistent LoRA shapes at {comp}.{one_line(module)} (A "
                                       f"{tuple(a.shape)}, B {tuple(b.shape)} {a.dtype}): the file is damaged, "
                                       "re-save it")
            norm = delta_norm(patch, comp, module)  # NaN/inf anywhere in A or B make it NaN/inf
            if not math.isfinite(norm):
                raise PatchFormatError(f"{where} has NaN/inf weights at {comp}.{one_line(module)}: the training "
                                       "diverged")
            if norm > MAX_DELTA_NORM:
                raise PatchFormatError(f"{where}: the weight change at {comp}.{one_line(module)} has norm {norm:.3g} "
                                       f"(limit {MAX_DELTA_NORM:g}): the patch would break the model")


def delta_norm(patch: Patch, comp: str, module: str) -> float:
    """Frobenius norm of scale * B @ A without forming it: |BA|^2 = sum((B^T B) * (A A^T)), r x r.
    float32 (no copy of fp32 tensors); a NaN or inf anywhere in A or B gives NaN or inf."""
    cache = patch.__dict__.setdefault("_unscaled_norms", {})  # read validates, load checks again: one product
    if (comp, module) not in cache:
        sd = patch.state_dicts[comp]
        a = sd[f"{module}.lora_A.weight"].float().flatten(1)
        b = sd[f"{module}.lora_B.weight"].float().flatten(1)
        sq = float(((b.T @ b).double() * (a @ a.T).double()).sum())
        cache[comp, module] = math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else math.inf
    return abs(patch.scale(comp, module)) * cache[comp, module]


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
    if not all(math.isfinite(w) for w in weights):
        raise PatchforgeError(f"merge weights must be finite numbers, got {weights}")
    if len(weights) != len(patches):
        raise PatchforgeError(f"{len(weights)} weights for {len(patches)} patches: give one weight per patch")
    unknown = next((p for p in patches if not p.metadata.get(K_BASE_ARCH)), None)
    if unknown is not None:  # the merged file would record no base: no pipeline would load it
        raise BaseModelMismatch(f"{unknown.path.name if unknown.path else 'a patch'} records no base architecture: "
                                f"it cannot be merged (re-train or re-save it with patchforge)")
    arches = {p.metadata.get(K_BASE_ARCH) for p in patches}
    if len(arches) > 1:
        names = ", ".join(f"{p.path or '?'} ({base_label(p.metadata)})" for p in patches)
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
            shapes = {(p.state_dicts[comp][f"{module}.lora_A.weight"].shape[1:],
                       p.state_dicts[comp][f"{module}.lora_B.weight"].shape[0]) for p, _ in members
                      if f"{module}.lora_A.weight" in p.state_dicts[comp]}
            if len(shapes) > 1:
                raise PatchforgeError(f"the patches disagree on the shape of {comp}.{one_line(module)}: they were made "
                                      f"for different models and cannot be merged")
            # the module's shapes from any patch that has it; zero blocks where a patch is absent
            a0, b0 = next((p.state_dicts[comp][f"{module}.lora_A.weight"],
                           p.state_dicts[comp][f"{module}.lora_B.weight"])
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
    from ..core.output_paths import check_output_file

    check_output_file(args.output, "-o", folder_ok=True)  # before any patch is read
    merged = merge_patches([read_patch(p) for p in args.patches], args.weights)
    out = write_patch(merged, args.output)
    print(f"merged {len(args.patches)} patches ({merged.concept}) -> {out}")
    return 0
