"""The training adapter's name and the LoRA helpers that methods, the loop and robust training share."""
from __future__ import annotations

from contextlib import contextmanager

import torch

ADAPTER = "forget"  # the peft adapter name a patch trains under


@contextmanager
def adapters_off(models):
    """Run the frozen base: peft adapters of `models` disabled inside the block."""
    models = [m for m in models if getattr(m, "peft_config", None)]
    for m in models:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in models:
            m.enable_adapters()


def has_adapter(module) -> bool:
    """A peft LoRA layer that carries the training adapter."""
    return ADAPTER in getattr(module, "lora_A", {})


def lora_delta(module) -> torch.Tensor:
    """The merged weight change B·A·scale of one peft LoRA layer (what SA's EWC penalty acts on)."""
    a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
    return (b @ a) * module.scaling[ADAPTER]
