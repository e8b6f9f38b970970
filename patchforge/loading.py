"""Putting forget patches into diffusers pipelines, and stacking them.

diffusers loads each LoRA as a PEFT adapter and then activates only the newest one (diffusers
#10392); it keeps no record of adapter weights. So patchforge keeps its own registry of loaded
patches (name -> weight), stored on the UNet (it travels with the component when a pipeline is
rebuilt with from_pipe), and after every change re-activates, layer by layer: the user's own
LoRAs that were active (their scales untouched, so whatever weights they set are kept) plus every
patch at its registered weight.

Pipelines gain methods only by explicit opt-in: `patchforge.enable(pipe)` binds the functions
below to that one pipeline object; nothing is patched into diffusers classes.
"""
from __future__ import annotations

import contextlib
import re
import types
import warnings
from dataclasses import dataclass

from .backbones import for_pipe
from .errors import PatchforgeError, PatchFormatError
from .patch_format import COMPONENTS, LORA_METADATA_KEY, TEXT_COMPONENTS, TEXT_PREFIX, Patch, check_base, read_patch

REGISTRY_ATTR = "_patchforge_patches"


@dataclass
class LoadedPatch:
    adapter_name: str
    concept: str
    method: str
    weight: float
    source: str
    components: tuple[str, ...]


def _registry(pipe) -> dict[str, LoadedPatch]:
    denoiser = for_pipe(pipe).denoiser
    reg = getattr(denoiser, REGISTRY_ATTR, None)
    if reg is None:
        reg = {}
        setattr(denoiser, REGISTRY_ATTR, reg)
    return reg


def _models(pipe):
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None:
            yield comp, model


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapters(pipe) -> set[str]:
    names = set()
    for _, model in _models(pipe):
        names.update(getattr(model, "peft_config", None) or {})
    return names


def _active(pipe) -> dict[str, list[str]]:
    """Active adapters per component, read from the layers (diffusers has no other record)."""
    out = {}
    for comp, model in _models(pipe):
        layers = _tuner_layers(model)
        if layers:
            out[comp] = list(layers[0].active_adapters)
    return out


def _is_fused(pipe) -> bool:
    return any(layer.merged for _, model in _models(pipe) for layer in _tuner_layers(model))


def _activate(pipe, active_before: dict[str, list[str]]) -> None:
    """Make active: the user's adapters that were active before, plus every patch at its weight."""
    reg = _registry(pipe)
    for comp, model in _models(pipe):
        layers = _tuner_layers(model)
        if not layers:
            continue
        present = set(getattr(model, "peft_config", None) or {})
        names = [n for n in active_before.get(comp, []) if n not in reg and n in present]
        names += [n for n in reg if n in present]
        for layer in layers:
            layer.set_adapter(names)
            for name in reg:
                layer.set_scale(name, reg[name].weight)  # no-op in layers the patch does not touch


# ----------------------------------------------------------------------------- public API

def load_forget_patch(pipe, src, weight: float = 1.0, adapter_name: str | None = None, *, weight_name: str | None = None,
                      subfolder: str | None = None, revision: str | None = None, strict: bool = False,
                      token: str | None = None, cache_dir: str | None = None) -> str:
    """Load a forget patch (file, folder or Hub repo id) into `pipe` beside what is already loaded.

    Returns the adapter name. Raises PatchFormatError (bad file), BaseModelMismatch (other base
    architecture; other checkpoint with strict=True) or PatchforgeError, leaving `pipe` unchanged."""
    from .hub import resolve_patch_file

    path = resolve_patch_file(src, weight_name=weight_name, subfolder=subfolder, revision=revision, token=token,
                              cache_dir=cache_dir)
    patch = read_patch(path)
    if _is_fused(pipe):
        raise PatchforgeError("the pipeline has fused LoRAs: call unfuse_forget_patches(pipe) (or pipe.unfuse_lora()) "
                              "before loading another patch")
    warning = check_base(patch, pipe, strict=strict)
    if warning:
        warnings.warn(warning, stacklevel=2)
    _check_modules(patch, pipe)
    existing = _adapters(pipe)
    name = adapter_name or _free_name(patch.concept, existing)
    if name in existing:
        raise PatchforgeError(f"an adapter named '{name}' is already loaded: pass another adapter_name or unload it "
                              f"first")
    active_before = _active(pipe)
    try:
        with _quiet():
            _load_adapter(pipe, patch, name)
    except Exception as err:  # undo a half-done load so the pipeline is as it was
        if name in _adapters(pipe):
            pipe.delete_adapters(name)
        if not existing:
            pipe.unload_lora_weights()
        else:
            _activate(pipe, active_before)
        raise PatchFormatError(f"{path} could not be loaded into this pipeline ({str(err).splitlines()[0][:160]}): "
                               f"check it was made for this base model") from err
    _registry(pipe)[name] = LoadedPatch(name, patch.concept, patch.method, float(weight), str(src),
                                        tuple(patch.components))
    _activate(pipe, active_before)
    return name


def _load_adapter(pipe, patch: Patch, name: str) -> None:
    """Hand the already-validated tensors to diffusers' own per-component loaders, with the file's
    LoRA metadata so rank and alpha come back exactly (not guessed from shapes)."""
    import json
    for_pipe(pipe).load_lora(patch.flat_state_dict(), name, json.loads(patch.metadata[LORA_METADATA_KEY]),
                             patch.components)


@contextlib.contextmanager
def _quiet():
    """Silence what a correct stacked load prints: transformers' load report lists the *other*
    adapters' weights as MISSING, and PEFT warns that the model already has adapters."""
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()


def _check_modules(patch: Patch, pipe) -> None:
    """Every patched module exists in the pipeline with matching shapes (before anything is loaded)."""
    import torch
    where = patch.path or "the patch"
    for comp in patch.components:
        model = getattr(pipe, comp, None)
        if model is None:
            raise PatchFormatError(f"{where} has {comp} weights but this pipeline has no {comp}: load it on its "
                                   f"own base model")
        flat = not hasattr(model, "text_model")  # transformers >= 5 dropped the text_model wrapper
        for module in patch.modules(comp):
            name = module.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS and flat else module
            try:
                target = model.get_submodule(name)
            except AttributeError:
                raise PatchFormatError(f"{where} patches {comp}.{module}, which this pipeline does not have: wrong "
                                       f"keys, or a patch for another model") from None
            target = getattr(target, "base_layer", target)
            a = patch.state_dicts[comp][f"{module}.lora_A.weight"]
            b = patch.state_dicts[comp][f"{module}.lora_B.weight"]
            w = getattr(target, "weight", None)
            ok = isinstance(w, torch.Tensor) and (
                (w.dim() == 2 and a.dim() == 2 and a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]) or
                (w.dim() == 4 and a.dim() == 4 and a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]))
            if not ok:
                raise PatchFormatError(f"{where}: LoRA shapes at {comp}.{module} (A {tuple(a.shape)}, B "
                                       f"{tuple(b.shape)}) do not fit the layer {tuple(w.shape) if w is not None else '?'}:"
                                       f" a patch for another model or a damaged file")


def _free_name(concept: str, taken: set[str]) -> str:
    base = "forget_" + (re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_")[:40] or "patch")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _get(pipe, name: str) -> LoadedPatch:
    reg = _registry(pipe)
    if name not in reg:
        loaded = ", ".join(reg) or "none"
        raise PatchforgeError(f"no forget patch named '{name}' is loaded (loaded: {loaded}): "
                              f"see list_forget_patches(pipe)")
    return reg[name]


def list_forget_patches(pipe) -> list[LoadedPatch]:
    """The loaded patches in load order, with concept, method, weight and source."""
    return list(_registry(pipe).values())


def set_forget_patch_weight(pipe, adapter_name: str, weight: float) -> None:
    """Change one patch's weight (negative re-amplifies the concept); others are unchanged."""
    entry = _get(pipe, adapter_name)
    if _is_fused(pipe):
        raise PatchforgeError("the patches are fused: call unfuse_forget_patches(pipe) before changing a weight")
    active_before = _active(pipe)
    entry.weight = float(weight)
    _activate(pipe, active_before)


def unload_forget_patch(pipe, adapter_name: str) -> None:
    """Remove one patch; the others and the user's LoRAs stay as they were (re-fused if fused)."""
    _get(pipe, adapter_name)
    fused = _is_fused(pipe)
    if fused:
        unfuse_forget_patches(pipe)
    _remove(pipe, [adapter_name])
    if fused and _adapters(pipe):
        fuse_forget_patches(pipe)


def unload_forget_patches(pipe) -> None:
    """Remove every patch. With no other LoRAs loaded, the LoRA layers go too and the pipeline
    computes exactly what the base does."""
    if _is_fused(pipe):
        unfuse_forget_patches(pipe)
    _remove(pipe, list(_registry(pipe)))


def _remove(pipe, names: list[str]) -> None:
    active_before = _active(pipe)
    reg = _registry(pipe)
    if names:
        pipe.delete_adapters(names)
    for n in names:
        reg.pop(n, None)
    if not _adapters(pipe):
        pipe.unload_lora_weights()  # drop the wrappers: bit-identical base forward
    else:
        _activate(pipe, active_before)


def fuse_forget_patches(pipe) -> None:
    """Bake the active adapters (patches at their weights, and the user's active LoRAs, which PEFT
    would otherwise skip once a layer is merged) into the base weights, for speed."""
    comps = [c for c, m in _models(pipe) if _tuner_layers(m)]
    if comps and not _is_fused(pipe):
        pipe.fuse_lora(components=comps, lora_scale=1.0)


def unfuse_forget_patches(pipe) -> None:
    comps = [c for c, m in _models(pipe) if _tuner_layers(m)]
    if comps:
        pipe.unfuse_lora(components=comps)


# ----------------------------------------------------------------------------- opt-in

METHODS = {
    "load_forget_patch": load_forget_patch,
    "list_forget_patches": list_forget_patches,
    "set_forget_patch_weight": set_forget_patch_weight,
    "unload_forget_patch": unload_forget_patch,
    "unload_forget_patches": unload_forget_patches,
    "fuse_forget_patches": fuse_forget_patches,
    "unfuse_forget_patches": unfuse_forget_patches,
}


def enable(pipe):
    """Give this one pipeline object the patch methods (pipe.load_forget_patch(...), ...).

    Binding on the instance changes no class, so save_pretrained and from_pretrained behave as
    before; a pipeline made later with from_pipe needs its own enable()."""
    if not hasattr(pipe, "load_lora_weights"):
        raise PatchforgeError(f"{type(pipe).__name__} cannot load LoRAs: use a Stable Diffusion (1.x, 2.x, XL) "
                              f"pipeline")
    for name, fn in METHODS.items():
        object.__setattr__(pipe, name, types.MethodType(fn, pipe))
    return pipe
