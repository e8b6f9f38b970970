"""A pipeline's trained LoRA adapter -> a forget patch file, stamped with its base's fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PatchforgeError
from .fingerprint import base_fingerprint
from .patch_format import COMPONENTS, K_TARGETS, TEXT_COMPONENTS, TEXT_PREFIX, Patch, write_patch


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
