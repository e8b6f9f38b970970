"""Putting forget patches into diffusers pipelines, and stacking them.

diffusers loads each LoRA as a PEFT adapter and then activates only the newest one (diffusers
#10392); `pipe.set_adapters`, `load_lora_weights` and `disable_lora` switch adapters off the same
way. The pipeline's PEFT layers are the only record of what is loaded, active and at which weight:
patchforge reads them, and beside them keeps only where each patch came from (concept, method,
source, content digest), on the denoiser (UNet or transformer) so it travels with the component into
`from_pipe` pipelines.

Patches fail closed: a forward pre-hook on every patched component checks, before each forward
pass, that every patch still loaded is active; one switched off behind patchforge's back is switched
back on with a loud warning. A patch removed with diffusers' own delete/unload calls is dropped from
the listing with a warning.

Fusing keeps a copy of the base weights it changes and unfusing puts them back, so fuse / unfuse /
unload return the base bit for bit (PEFT alone unmerges by subtraction and drifts). A failed load
restores the module tree and the touched weights as they were, then checks the base fingerprint.

Pipelines gain methods only by explicit opt-in: `patchforge.enable(pipe)` binds the functions
below to that one pipeline object; nothing is patched into diffusers classes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import threading
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from . import adapter_inject
from ..backbones import for_pipe
from ..errors import PatchforgeError, PatchFormatError, one_line
from .fingerprint import base_fingerprint, base_modules, base_parameters, check_base
from .patch_format import (K_BASE_WEIGHTS, K_BASE_WEIGHTS_V2, TEXT_COMPONENTS, TEXT_PREFIX, Patch, delta_norm,
                           peft_config_kwargs, read_patch)

REGISTRY_ATTR = "_patchforge_patches"  # on the denoiser: adapter name -> LoadedPatch (provenance only)
KEPT_ATTR = "_patchforge_unfused"  # on each component while fused: module name -> base weight before the fuse
GUARD_ATTR = "_patchforge_guard"  # on each patched component: the forward pre-hook handle
LOCK_ATTR = "_patchforge_lock"  # on the denoiser: held while patchforge changes the patches
GUARD_SEEN_ATTR = "_patchforge_guard_seen"  # on the denoiser: the adapter state the guards last checked
SUSPENDED_ATTR = "_patchforge_suspended"  # on the denoiser while patches_suspended() runs: the guard stands by
MAX_WEIGHT = 100.0
MAX_RELATIVE_DELTA = 10.0  # a patch may change a layer by at most 10x the layer's own norm (at weight 1)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


_LOCKS = threading.Lock()  # guards the creation of each pipeline's own lock


@contextlib.contextmanager
def _exclusive(models):
    """One patch change at a time per pipeline: a second thread that loads, unloads or fuses while
    another one does is refused (a half-finished load seen by another thread would be rolled back
    under it)."""
    denoiser = next(iter(models.values()))
    with _LOCKS:
        lock = denoiser.__dict__.setdefault(LOCK_ATTR, threading.RLock())  # re-entrant: unload calls unfuse
    if not lock.acquire(blocking=False):
        raise PatchforgeError("another thread is changing this pipeline's forget patches: load, unload and fuse "
                              "patches from one thread at a time")
    try:
        yield
    finally:
        lock.release()


def _one_at_a_time(fn):
    @functools.wraps(fn)
    def run(pipe, *args, **kwargs):
        with _exclusive(_models(pipe)):
            return fn(pipe, *args, **kwargs)
    return run


class PatchesSwitchedWarning(UserWarning):
    """Forget patches were switched off or removed by something other than patchforge."""


@dataclass
class LoadedPatch:
    adapter_name: str
    concept: str
    method: str
    weight: float
    source: str
    components: tuple[str, ...]
    active: bool = True
    digest: str = ""


def _models(pipe) -> dict:
    """component name -> module for the components this pipeline has; the backbone lists the denoiser first."""
    return for_pipe(pipe).models()


def _registry(models) -> dict[str, LoadedPatch]:
    denoiser = next(iter(models.values()))
    reg = denoiser.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        reg = {}
        denoiser.__dict__[REGISTRY_ATTR] = reg
    return reg


def _tuner_layers(model, named: bool = False):
    from peft.tuners.tuners_utils import BaseTunerLayer
    # the adapter-blind walk: its cost does not grow with the number of adapters loaded
    layers = [(n, m) for n, m in base_modules(model) if isinstance(m, BaseTunerLayer)]
    return layers if named else [m for _, m in layers]


def _adapters(models) -> set[str]:
    names = set()
    for model in models.values():
        names.update(getattr(model, "peft_config", None) or {})
    return names


def _active(models) -> dict[str, list[str]]:
    """Active adapters per component, read from the layers (diffusers has no other record)."""
    out = {}
    for comp, model in models.items():
        layers = _tuner_layers(model)
        if layers:
            out[comp] = list(layers[0].active_adapters)
    return out


def _is_fused(models) -> bool:
    return any(layer.merged for model in models.values() for layer in _tuner_layers(model))


def _activate(models, active_before: dict[str, list[str]]) -> None:
    """Make active: the user's adapters that were active before, plus every patch (scales untouched)."""
    reg = _registry(models)
    for comp, model in models.items():
        layers = _tuner_layers(model)
        if not layers:
            continue
        present = set(getattr(model, "peft_config", None) or {})
        names = [n for n in active_before.get(comp, []) if n not in reg and n in present]
        names += [n for n in reg if n in present]
        for layer in layers:
            if layer.disable_adapters:
                layer.enable_adapters(True)
            layer.set_adapter(names)


def _layer_weight(layer, name: str) -> float:
    """The weight a layer applies to adapter `name` (PEFT's set_scale stores weight * alpha / r)."""
    base = layer.lora_alpha[name] / (math.sqrt(layer.r[name]) if layer.use_rslora.get(name) else layer.r[name])
    return layer.scaling[name] / base


def _faults(models, reg) -> dict[str, set[str]]:
    """What keeps each patch from acting fully, read from every one of its layers:
    'off': disabled, or not among the active adapters, in a layer that is not fused;
    'unfused': left out of a fuse (a fused layer computes only what was fused into it: diffusers'
    fuse_lora fuses the adapters active at that moment, and load_lora_weights leaves only its own one);
    'uneven': its layers hold different weights (some scaled down or to zero behind patchforge's back)."""
    faults: dict[str, set[str]] = {}
    weights: dict[str, set[float]] = {}
    for model in models.values():
        for layer in _tuner_layers(model):
            for n in reg:
                if n not in getattr(layer, "lora_A", {}):
                    continue
                if layer.merged:
                    if n not in layer.merged_adapters:
                        faults.setdefault(n, set()).add("unfused")
                elif layer.disable_adapters or n not in layer.active_adapters:
                    faults.setdefault(n, set()).add("off")
                weights.setdefault(n, set()).add(round(_layer_weight(layer, n), 9))
    for n, ws in weights.items():
        if len(ws) > 1:
            faults.setdefault(n, set()).add("uneven")
        elif ws:  # one weight everywhere: a weight set through diffusers' set_adapters is the patch's weight
            reg[n].weight = ws.pop()
    return faults


def _repair(models, reg, faults: dict[str, set[str]]) -> None:
    """Make every patch act fully again. A user's LoRA that diffusers' disable_lora switched off stays
    off: only the patches come back."""
    for model in models.values():
        layers = _tuner_layers(model)
        present = set(getattr(model, "peft_config", None) or {})
        patches = [n for n in reg if n in present]
        for layer in layers:
            if not set(patches) & set(getattr(layer, "lora_A", {})):
                continue
            for n in patches:
                if "uneven" in faults.get(n, ()) and n in layer.scaling:
                    layer.set_scale(n, reg[n].weight)
            if layer.merged:  # fuse what a fuse left out, so the fused layer computes the patch too
                missing = [n for n in patches if n in layer.lora_A and n not in layer.merged_adapters]
                if missing:
                    with warnings.catch_warnings():  # PEFT's "now additionally merging": said below, once
                        warnings.simplefilter("ignore")
                        layer.merge(adapter_names=missing)
            user = [] if layer.disable_adapters else [n for n in layer.active_adapters if n not in reg]
            if layer.disable_adapters:
                layer.enable_adapters(True)
            if set(layer.active_adapters) != set(user + patches):
                layer.set_adapter(user + patches)


def _sync(models, repair: bool = True) -> dict[str, LoadedPatch]:
    """Bring the provenance registry in line with the PEFT layers, and (repair) make every patch act
    fully again where something else switched it off, left it out of a fuse or rescaled some of its
    layers. Runs before every patchforge call and, through the guard, before every forward pass."""
    reg = _registry(models)
    if not reg or next(iter(models.values())).__dict__.get(SUSPENDED_ATTR):
        return reg
    present = _adapters(models)
    gone = [n for n in reg if n not in present]
    for n in gone:
        del reg[n]
    if gone:
        warnings.warn(f"forget patch(es) {', '.join(gone)} were removed outside patchforge (delete_adapters / "
                      f"unload_lora_weights): they no longer apply", PatchesSwitchedWarning, stacklevel=3)
    if not _is_fused(models):
        _restore_base(models)  # copies left by a fuse that diffusers (not patchforge) undid
    if not reg:
        _remove_guards(models)
        return reg
    faults = _faults(models, reg)
    if faults and repair:
        _repair(models, reg, faults)
        said = {"off": "had been switched off (pipe.set_adapters, load_lora_weights and disable_lora keep only the "
                       "adapters they name): patchforge switched them back on",
                "unfused": "had been left out of a fuse (fuse_lora fuses only the adapters active at that moment): "
                           "patchforge fused them too",
                "uneven": "had been rescaled in some of their layers: patchforge set every layer back to the patch's "
                          "weight"}
        for kind in ("off", "unfused", "uneven"):
            names = [n for n, f in faults.items() if kind in f]
            if names:
                warnings.warn(f"forget patch(es) {', '.join(names)} {said[kind]}. Turn a patch off with "
                              f"unload_forget_patch, set_forget_patch_weight(name, 0) or patchforge.without_patches"
                              f"(pipe)", PatchesSwitchedWarning, stacklevel=3)
    _install_guards(models)  # a component whose LoRA layers came after the patch gets its guard too
    return reg


@contextlib.contextmanager
def patches_suspended(pipe):
    """Run the frozen base for a while (every LoRA layer off), said out loud: the guard that switches
    silently disabled patches back on stands by until the block ends, then every adapter is back."""
    models = _models(pipe)
    denoiser = next(iter(models.values()))
    if not _adapters(models) or denoiser.__dict__.get(SUSPENDED_ATTR):
        yield
        return
    denoiser.__dict__[SUSPENDED_ATTR] = True
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()
        denoiser.__dict__.pop(SUSPENDED_ATTR, None)


@contextlib.contextmanager
def without_patches(pipe):
    """Generate without the forget patches for the length of a `with` block; the user's own LoRAs stay
    as they are. The guard stands by until the block ends, then the patches act again:

        with patchforge.without_patches(pipe):
            image = pipe(prompt).images[0]
    """
    models = _models(pipe)
    reg = _sync(models)
    denoiser = next(iter(models.values()))
    if not reg or denoiser.__dict__.get(SUSPENDED_ATTR):
        yield
        return
    if _is_fused(models):
        raise PatchforgeError("the patches are fused into the weights: call unfuse_forget_patches(pipe) first")
    before = {id(layer): list(layer.active_adapters) for model in models.values() for layer in _tuner_layers(model)}
    denoiser.__dict__[SUSPENDED_ATTR] = True
    try:
        for model in models.values():
            for layer in _tuner_layers(model):
                layer.set_adapter([n for n in layer.active_adapters if n not in reg])
        yield
    finally:
        for model in models.values():
            for layer in _tuner_layers(model):
                if id(layer) in before:
                    layer.set_adapter(before[id(layer)])
        denoiser.__dict__.pop(SUSPENDED_ATTR, None)


def _adapter_state(models, layers: dict) -> tuple:
    """Everything diffusers' and PEFT's adapter calls can change, read from every LoRA layer: which
    adapters are active, disabled, fused, and at what scale. `layers` caches each component's LoRA
    layers (found by a walk over the whole model) until its adapter names change."""
    state = []
    for comp, model in models.items():
        names = tuple(sorted(getattr(model, "peft_config", None) or {}))
        if comp not in layers or layers[comp][0] != names:
            layers[comp] = (names, _tuner_layers(model))
        state.append((comp, names, tuple((tuple(layer.active_adapters), layer.disable_adapters,
                                          tuple(layer.merged_adapters), tuple(layer.scaling.items()))
                                         for layer in layers[comp][1])))
    return tuple(state)


def _install_guards(models) -> None:
    denoiser = next(iter(models.values()))
    seen = denoiser.__dict__.setdefault(GUARD_SEEN_ATTR, {"state": None, "layers": {}})

    def guard(module, args) -> None:  # returns None: a pre-hook's return value would replace the inputs
        # The repair walks every layer; run it only when the adapter state moved since it last ran, so a
        # denoising step pays a read of each LoRA layer's flags, not a walk over thousands of modules.
        if seen["state"] is not None and _adapter_state(models, seen["layers"]) == seen["state"]:
            return
        _sync(models)
        seen["state"] = _adapter_state(models, seen["layers"])

    for model in models.values():
        if model.__dict__.get(GUARD_ATTR) is None and _tuner_layers(model):  # the cheap test first: no walk
            model.__dict__[GUARD_ATTR] = model.register_forward_pre_hook(guard)
            seen["state"] = None  # a new guard: the next forward checks everything


def _remove_guards(models) -> None:
    for model in models.values():
        handle = model.__dict__.pop(GUARD_ATTR, None)
        if handle is not None:
            handle.remove()
    next(iter(models.values())).__dict__.pop(GUARD_SEEN_ATTR, None)


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or \
            abs(weight) > MAX_WEIGHT:
        raise PatchforgeError(f"a patch weight must be a finite number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                              f"got {weight!r}")
    return float(weight)


# ----------------------------------------------------------------------------- exact fuse / unfuse

def _keep_base(models) -> None:
    """Before a fuse: copy the base weight of every layer the fuse will change."""
    for model in models.values():
        kept = {}
        for name, layer in _tuner_layers(model, named=True):
            if set(layer.active_adapters) & set(getattr(layer, "lora_A", {})):
                kept[name] = layer.get_base_layer().weight.detach().clone()
        if kept:
            model.__dict__[KEPT_ATTR] = kept


def _restore_base(models) -> None:
    """After an unfuse: put the kept base weights back, bit for bit (PEFT's subtraction leaves ~1e-8)."""
    import torch
    for model in models.values():
        kept = model.__dict__.pop(KEPT_ATTR, None)
        if not kept:
            continue
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in kept.items():
                layer = modules.get(name)
                if layer is not None and hasattr(layer, "get_base_layer"):
                    layer.get_base_layer().weight.copy_(weight)


# ----------------------------------------------------------------------------- rollback

class _Snapshot:
    """Everything a load may change, to put back if it fails: module attributes (children,
    parameters, buffers, hooks, PEFT bookkeeping: containers copied one level deep) and the values
    of the base weights the patch touches.

    `everything`: every module of the patched components (diffusers' loaders walk and change the
    whole model). Otherwise (adapter_inject, which builds exactly the patch's modules): the pipeline,
    the components, each patched module, its parent and its direct children (a LoRA layer's adapter
    containers). Either way base_unchanged() then checks the whole tree."""

    CONTAINERS = (dict, OrderedDict, list, set)

    def __init__(self, pipe, models, patch: Patch, everything: bool = True):
        if everything:
            objs = [pipe] + [m for comp in patch.components for m in models[comp].modules()]
        else:
            objs = [pipe] + [models[comp] for comp in patch.components]
            for comp in patch.components:
                for module in patch.modules(comp):
                    name = _local_name(models[comp], comp, module)
                    parent = models[comp].get_submodule(name.rpartition(".")[0])
                    target = parent._modules[name.rpartition(".")[2]]
                    objs += [parent, target, *target._modules.values()]
            objs = list({id(o): o for o in objs if o is not None}.values())
        self.attrs = [(o, {k: (type(v)(v) if type(v) in self.CONTAINERS else v) for k, v in vars(o).items()})
                      for o in objs]
        self.models, self.params = models, _base_params(models)
        self.weights = []
        for comp in patch.components:
            for module in patch.modules(comp):
                target = _target(models[comp], comp, module)
                base = getattr(target, "base_layer", target)  # other adapters' tensors are not the base
                for p in (base.parameters(recurse=True) if base is not None else []):
                    self.weights.append((p, p.detach().clone()))

    def base_unchanged(self) -> bool:
        """After a load: the same base parameters under the same names (no module wrapped or
        replaced) and the touched weights bit for bit as they were."""
        import torch
        return _base_params(self.models) == self.params and all(torch.equal(p, saved) for p, saved in self.weights)

    def restore(self) -> None:
        import torch
        for obj, attrs in self.attrs:
            obj.__dict__.clear()
            obj.__dict__.update(attrs)
        with torch.no_grad():
            for p, saved in self.weights:
                p.copy_(saved)


def _base_params(models) -> list[tuple[str, int]]:
    return [(f"{comp}.{name}", id(p)) for comp, model in models.items() for name, p in base_parameters(model)]


def _local_name(model, comp: str, module: str) -> str:
    """A patch's (canonical) module name as this model names it."""
    flat = not hasattr(model, "text_model")  # transformers >= 5 dropped the text_model wrapper
    return module.removeprefix(TEXT_PREFIX) if comp in TEXT_COMPONENTS and flat else module


def _target(model, comp: str, module: str):
    try:
        return model.get_submodule(_local_name(model, comp, module))
    except AttributeError:
        return None


# ----------------------------------------------------------------------------- public API

@_one_at_a_time
def load_forget_patch(pipe, src, weight: float = 1.0, adapter_name: str | None = None, *,
                      weight_name: str | None = None,
                      subfolder: str | None = None, revision: str | None = None, strict: bool = False,
                      token: str | None = None, cache_dir: str | None = None, allow_duplicate: bool = False) -> str:
    """Load a forget patch (file, folder or Hub repo id) into `pipe` beside what is already loaded.

    Returns the adapter name. Raises PatchFormatError (bad file), BaseModelMismatch (other or unknown
    base architecture; other checkpoint with strict=True) or PatchforgeError (among others: the same
    patch already loaded, unless allow_duplicate=True), leaving `pipe` unchanged."""
    from .hub import resolve_patch_file

    weight = _check_weight(weight)
    if adapter_name is not None and not (isinstance(adapter_name, str) and ADAPTER_NAME.match(adapter_name)):
        raise PatchforgeError(f"adapter_name {str(adapter_name)[:40]!r} is not allowed: "
                              "use 1-64 letters, digits, _ or -")
    models = _models(pipe)
    reg = _sync(models)
    path = resolve_patch_file(src, weight_name=weight_name, subfolder=subfolder, revision=revision, token=token,
                              cache_dir=cache_dir)
    patch = read_patch(path)
    if _is_fused(models):
        raise PatchforgeError("the pipeline has fused LoRAs: call unfuse_forget_patches(pipe) (or pipe.unfuse_lora()) "
                              "before loading another patch")
    fingerprint = base_fingerprint(pipe, legacy=not patch.metadata.get(K_BASE_WEIGHTS_V2))
    warning = check_base(patch, pipe, strict=strict, fingerprint=fingerprint)
    _check_modules(patch, models)
    twin = next((e.adapter_name for e in reg.values() if e.digest == patch.digest), None)
    if twin and not allow_duplicate:
        raise PatchforgeError(f"{path} is already loaded as '{twin}' (loading it again would double its strength): "
                              f"use set_forget_patch_weight, or pass allow_duplicate=True")
    existing = _adapters(models)
    name = adapter_name or _free_name(patch.concept, existing)
    if name in existing:
        raise PatchforgeError(f"an adapter named '{name}' is already loaded: pass another adapter_name or unload it "
                              f"first")
    if warning:
        warnings.warn(warning, stacklevel=2)
    active_before = _active(models)
    direct = adapter_inject.available(models)
    snapshot = _Snapshot(pipe, models, patch, everything=not direct)
    try:
        with _quiet():
            _load_adapter(pipe, models, patch, name, direct)
        if not snapshot.base_unchanged():
            raise RuntimeError("the load changed the base model")
    except Exception as err:  # put everything back so the pipeline is as it was
        snapshot.restore()
        if base_fingerprint(pipe, legacy=K_BASE_WEIGHTS in fingerprint) != fingerprint:
            raise PatchforgeError(f"loading {path} failed and the pipeline could not be restored: reload the "
                                  f"pipeline") from err
        raise PatchFormatError(f"{path} could not be loaded into this pipeline "
                               f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}): "
                               f"check it was made for this base model") from err
    reg[name] = LoadedPatch(name, patch.concept, patch.method, weight, str(src), tuple(patch.components),
                            digest=patch.digest)
    for model in models.values():
        for layer in _tuner_layers(model):
            layer.set_scale(name, weight)  # no-op in layers the patch does not touch
    _activate(models, active_before)
    _install_guards(models)
    return name


def _load_adapter(pipe, models, patch: Patch, name: str, direct: bool) -> None:
    """Build the already-validated patch's LoRA layers with a config rebuilt by patchforge (never the
    file's own): module by module (adapter_inject) when `direct`, else through diffusers' own
    per-component loaders (the backbone's load_lora)."""
    configs = {comp: peft_config_kwargs(patch, comp, not hasattr(models[comp], "text_model"))
               for comp in patch.components}
    if direct:
        for comp in patch.components:
            model, sd = models[comp], patch.state_dicts[comp]
            modules = {_local_name(model, comp, m): (sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"])
                       for m in patch.modules(comp)}
            adapter_inject.inject(model, modules, configs[comp], name)
        return
    metadata = {f"{comp}.{k}": v for comp in patch.components for k, v in configs[comp].items()}
    for_pipe(pipe).load_lora(patch.flat_state_dict(), name, metadata, patch.components)


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


def _check_modules(patch: Patch, models) -> None:
    """Every patched module exists in the pipeline with matching shapes, and the patch changes it by
    a sane amount (before anything is loaded)."""
    import torch
    where = patch.path or "the patch"
    for comp in patch.components:
        model = models.get(comp)
        if model is None:
            raise PatchFormatError(f"{where} has {comp} weights but this pipeline has no {comp}: load it on its "
                                   f"own base model")
        for module in patch.modules(comp):
            target = _target(model, comp, module)
            if target is None:
                raise PatchFormatError(f"{where} patches {comp}.{one_line(module, 80)}, which this pipeline does not "
                                       f"have: wrong keys, or a patch for another model")
            target = getattr(target, "base_layer", target)
            a = patch.state_dicts[comp][f"{module}.lora_A.weight"]
            b = patch.state_dicts[comp][f"{module}.lora_B.weight"]
            w = getattr(target, "weight", None)
            ok = isinstance(target, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(w, torch.Tensor) and (
                (w.dim() == 2 and a.dim() == 2 and a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]) or
                (w.dim() == 4 and a.dim() == 4 and a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]))
            if not ok:
                raise PatchFormatError(f"{where}: LoRA shapes at {comp}.{one_line(module, 80)} (A {tuple(a.shape)}, B "
                                       f"{tuple(b.shape)}) do not fit the layer "
                                       f"{tuple(w.shape) if w is not None else '?'}:"
                                       f" a patch for another model or a damaged file")
            limit = MAX_RELATIVE_DELTA * float(torch.linalg.vector_norm(w.detach().float()))
            change = delta_norm(patch, comp, module)
            if not change <= limit:
                raise PatchFormatError(f"{where}: the change at {comp}.{one_line(module, 80)} is {change:.3g}"
                                       f", over {MAX_RELATIVE_DELTA:g}x the layer's own size: the patch would break "
                                       f"the model")


def _free_name(concept: str, taken: set[str]) -> str:
    base = "forget_" + (re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_")[:40] or "patch")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _get(models, name: str) -> LoadedPatch:
    reg = _sync(models)
    if name not in reg:
        loaded = ", ".join(reg) or "none"
        raise PatchforgeError(f"no forget patch named '{str(name)[:64]}' is loaded (loaded: {loaded}): "
                              f"see list_forget_patches(pipe)")
    return reg[name]


def list_forget_patches(pipe) -> list[LoadedPatch]:
    """The loaded patches in load order, as the pipeline's PEFT layers have them: weight and active
    state are read from the layers (a patch switched off behind patchforge's back is switched back
    on first, with a warning; one deleted with diffusers is gone from the list)."""
    models = _models(pipe)
    reg = _sync(models)
    faults = _faults(models, reg)  # none after the repair, unless a layer refused it
    return [dataclasses.replace(e, active=e.adapter_name not in faults) for e in reg.values()]


@_one_at_a_time
def set_forget_patch_weight(pipe, adapter_name: str, weight: float) -> None:
    """Change one patch's weight (negative re-amplifies the concept); others are unchanged."""
    weight = _check_weight(weight)
    models = _models(pipe)
    entry = _get(models, adapter_name)
    if _is_fused(models):
        raise PatchforgeError("the patches are fused: call unfuse_forget_patches(pipe) before changing a weight")
    entry.weight = weight
    for model in models.values():
        for layer in _tuner_layers(model):
            layer.set_scale(adapter_name, weight)


@_one_at_a_time
def unload_forget_patch(pipe, adapter_name: str) -> None:
    """Remove one patch; the others and the user's LoRAs stay as they were (re-fused if fused)."""
    models = _models(pipe)
    _get(models, adapter_name)
    fused = _is_fused(models)
    if fused:
        unfuse_forget_patches(pipe)
    _remove(pipe, models, [adapter_name])
    if fused and _adapters(models):
        fuse_forget_patches(pipe)


@_one_at_a_time
def unload_forget_patches(pipe) -> None:
    """Remove every patch. With no other LoRAs loaded, the LoRA layers go too and the pipeline
    computes exactly what the base does, fused before or not."""
    models = _models(pipe)
    reg = _sync(models)
    if _is_fused(models):
        unfuse_forget_patches(pipe)
    _remove(pipe, models, list(reg))


def _remove(pipe, models, names: list[str]) -> None:
    active_before = _active(models)
    reg = _registry(models)
    if names:
        pipe.delete_adapters(names)
    for n in names:
        reg.pop(n, None)
    if not _adapters(models):
        pipe.unload_lora_weights()  # drop the wrappers: bit-identical base forward
    else:
        _activate(models, active_before)
    if not reg:
        _remove_guards(models)


@_one_at_a_time
def fuse_forget_patches(pipe) -> None:
    """Bake the active adapters (patches at their weights, and the user's active LoRAs, which PEFT
    would otherwise skip once a layer is merged) into the base weights, for speed. The base weights
    it changes are kept, so unfusing restores them exactly."""
    models = _models(pipe)
    _sync(models)
    comps = [c for c, m in models.items() if _tuner_layers(m)]
    if comps and not _is_fused(models):
        _keep_base(models)
        pipe.fuse_lora(components=comps, lora_scale=1.0)


@_one_at_a_time
def bake_forget_patches(pipe) -> None:
    """Fuse the active adapters into the base weights and drop every LoRA layer: from then on the
    pipeline runs at exactly the base model's cost per image. Irreversible in this pipeline (reload
    the base to undo); the user's own LoRAs are baked in too."""
    fuse_forget_patches(pipe)
    models = _models(pipe)
    if _adapters(models):
        pipe.unload_lora_weights()  # diffusers keeps fused weights when it removes the layers
    for model in models.values():  # nothing left to unfuse to: drop the kept base weights
        model.__dict__.pop(KEPT_ATTR, None)
    _registry(models).clear()
    _remove_guards(models)


@_one_at_a_time
def unfuse_forget_patches(pipe) -> None:
    """Undo fuse_forget_patches: the kept base weights come back bit for bit."""
    models = _models(pipe)
    comps = [c for c, m in models.items() if _tuner_layers(m)]
    if comps:
        pipe.unfuse_lora(components=comps)
    _restore_base(models)


# ----------------------------------------------------------------------------- opt-in

METHODS = {
    "load_forget_patch": load_forget_patch,
    "list_forget_patches": list_forget_patches,
    "set_forget_patch_weight": set_forget_patch_weight,
    "unload_forget_patch": unload_forget_patch,
    "unload_forget_patches": unload_forget_patches,
    "fuse_forget_patches": fuse_forget_patches,
    "bake_forget_patches": bake_forget_patches,
    "unfuse_forget_patches": unfuse_forget_patches,
}


def enable(pipe):
    """Give this one pipeline object the patch methods (pipe.load_forget_patch(...), ...).

    Binding on the instance changes no class, so save_pretrained and from_pretrained behave as
    before; a pipeline made later with from_pipe needs its own enable()."""
    if not hasattr(pipe, "load_lora_weights"):
        raise PatchforgeError(f"{type(pipe).__name__} cannot load LoRAs: use a Stable Diffusion (1.x, 2.x, XL, 3, "
                              f"3.5) or FLUX.1 pipeline")
    for_pipe(pipe)  # a pipeline of no supported family fails here, not at the first load
    for name, fn in METHODS.items():
        object.__setattr__(pipe, name, types.MethodType(fn, pipe))
    return pipe
