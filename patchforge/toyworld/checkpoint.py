"""Resumable toy builds: the training state of a stage in one safetensors file, written atomically.

Tensors (weights, optimizer moments, torch's RNG state) are safetensors tensors; everything else (the
step, the optimizer's and LR schedule's plain values, Python's RNG state) is JSON in the file's
metadata. Nothing is pickled, so loading a checkpoint runs no code. Restoring every piece of state a
step reads makes a resumed build continue bit-exactly where it stopped.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.atomic import atomic_path
from ..errors import PatchforgeError

FILE = "checkpoint.safetensors"


def _split(obj, prefix: str, tensors: dict):
    """Replace tensors inside nested dicts/lists by {"$t": key}, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().clone()
        return {"$t": prefix}
    if isinstance(obj, dict):
        return {"$d": [[k, _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict) and "$t" in obj:
        return tensors[obj["$t"]]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj["$d"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save(path: Path, step: int, modules: dict, stateful: dict, rng: random.Random, extra: dict | None = None) -> None:
    """modules: name -> nn.Module (weights); stateful: name -> object with state_dict() (optimizers,
    LR schedules)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"module.{name}.{k}"] = v.detach().contiguous().clone()
    meta = {"step": step, "extra": extra or {},
            "state": {name: _split(obj.state_dict(), f"state.{name}", tensors) for name, obj in stateful.items()},
            "python_rng": _split(list(rng.getstate()), "rng", tensors)}
    tensors["torch_rng"] = torch.get_rng_state()
    with atomic_path(Path(path)) as tmp:  # an interrupted save leaves the previous checkpoint whole
        save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)})


def _read(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
            return meta, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (OSError, KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise PatchforgeError(f"cannot read the build checkpoint {path}: {e}") from None


def read_extra(path: Path) -> dict:
    """The `extra` a checkpoint was saved with (no tensors loaded)."""
    return _read(path, tensors=False)[0]["extra"]


def load(path: Path, modules: dict, stateful: dict, rng: random.Random) -> dict:
    """Restore what `save` wrote into the given objects; returns {"step": ..., "extra": ...}."""
    meta, tensors = _read(path)
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, obj in stateful.items():
        obj.load_state_dict(_join(meta["state"][name], tensors))
    state = _join(meta["python_rng"], tensors)
    rng.setstate((state[0], tuple(state[1]), state[2]))
    torch.set_rng_state(tensors["torch_rng"])
    return {"step": meta["step"], "extra": meta["extra"]}
