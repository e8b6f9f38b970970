"""Putting a checked patch's LoRA layers into a component, module by named module.

diffusers' `load_lora_weights` hands each component to PEFT's `inject_adapter_in_model`, which walks
every module of the model to find the targets, marks every parameter trainable or not, switches every
LoRA layer to the new adapter, and then loads the state dict by walking the model again. Those walks
grow with every adapter already loaded (each adds modules to every LoRA layer), so the 50th load of a
stack costs several times the first. patchforge has already read, checked and shape-matched every
module of the patch (loading._check_modules), so it knows the exact modules: this module builds the
LoRA layers of exactly those, with PEFT's own per-module code (`LoraModel._create_and_replace`: a new
wrapper around a plain layer, `update_layer` on a layer that holds other adapters), copies the file's
tensors in, and records the adapter the way diffusers and transformers do (`peft_config[name]`,
`_hf_peft_config_loaded`). The result is the state diffusers' own loaders leave, so `set_adapters`,
`delete_adapters`, `fuse_lora`, `unload_lora_weights` and the patch file itself work as before.

Only the allow-listed LoRA options reach PEFT (patch_format.peft_config_kwargs); anything else is
refused here, before a layer is built.
"""
from __future__ import annotations

from ..errors import PatchFormatError, one_line

# what patch_format.peft_config_kwargs builds; anything else never reaches PEFT
CONFIG_KEYS = frozenset({"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                         "init_lora_weights"})


def available(models: dict) -> bool:
    """Whether this load can go module by module: the installed PEFT has the per-module calls used
    here, and no component carries offloading or other hooks (accelerate's `_hf_hook`, diffusers'
    `_diffusers_hook`: CPU / sequential / group offloading), which diffusers' loaders take off and
    put back around a load. Otherwise diffusers' loaders are used."""
    from .fingerprint import base_modules

    try:
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError:
        return False
    if not (all(hasattr(LoraModel, a) for a in ("_create_and_replace", "_replace_module", "_create_new_module"))
            and hasattr(LoraLayer, "update_layer")):
        return False
    return not any("_hf_hook" in m.__dict__ or "_diffusers_hook" in m.__dict__
                   for model in models.values() for _, m in base_modules(model))


def inject(model, modules: dict[str, tuple], config_kwargs: dict, adapter_name: str) -> None:
    """Add adapter `adapter_name` to `model` at exactly `modules` ({module name in this model: (A, B)}),
    with LoRA config `config_kwargs`. The adapter takes each base layer's device and dtype (PEFT's
    update_layer puts it there), as diffusers' loaders leave it."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    extra = set(config_kwargs) - CONFIG_KEYS
    if extra or config_kwargs.get("init_lora_weights") is not False:
        raise PatchFormatError(f"LoRA option(s) {', '.join(sorted(extra))[:80] or 'init_lora_weights'} not allowed "
                               f"in a forget patch")
    config = LoraConfig(**config_kwargs)
    # a tuner that injects nothing by itself: its per-module method is PEFT's own layer construction
    tuner = LoraModel.__new__(LoraModel)
    torch.nn.Module.__init__(tuner)
    tuner.__dict__.update(peft_config={adapter_name: config}, active_adapter=adapter_name, targeted_module_names=[],
                          targeted_parameter_names=[])
    tuner.__dict__["_modules"]["model"] = model
    for name, (a, b) in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tuner._create_and_replace(config, adapter_name, parent._modules[child], child, parent, current_key=name)
        layer = parent._modules[child]
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if tuple(lora_a.weight.shape) != tuple(a.shape) or tuple(lora_b.weight.shape) != tuple(b.shape):
            raise PatchFormatError(f"LoRA shapes at {one_line(name, 80)} do not fit the layer")
        with torch.no_grad():
            lora_a.weight.copy_(a)
            lora_b.weight.copy_(b)
    configs = model.__dict__.get("peft_config")
    if configs is None:
        model.peft_config = configs = {}
    configs[adapter_name] = config
    model._hf_peft_config_loaded = True
