"""Finding and loading base pipelines: the embedded toy model by default, any diffusers SD
1.x / 2.x / SDXL folder or Hub repo id otherwise."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..errors import PatchforgeError

TOY_MODEL_DIR = Path(__file__).parents[1] / "toy_model"  # patchforge/toy_model
TOY_MODEL_ID = "patchforge/toy-sd"  # the name the embedded default goes by in metadata and reports
# The embedded diffusion-transformer toy (SD3 layout), sharing the UNet toy's VAE, text encoder and judges
TOY_SD3_DIR = TOY_MODEL_DIR / "sd3"
TOY_SD3_ID = "patchforge/toy-sd3"
_TOY_NAMES = {None: TOY_MODEL_ID, "toy": TOY_MODEL_ID, TOY_MODEL_ID: TOY_MODEL_ID, TOY_SD3_ID: TOY_SD3_ID}
_TOY_FOLDERS = {TOY_MODEL_ID: TOY_MODEL_DIR, TOY_SD3_ID: TOY_SD3_DIR}
_TOY_BUILD = {TOY_MODEL_ID: "patchforge toy train", TOY_SD3_ID: "patchforge toy train --family sd3"}


def resolve_model(model: str | None) -> str:
    """None, 'toy' or an embedded toy's name -> its folder; anything else is passed to diffusers."""
    if model in _TOY_NAMES:  # by name (a folder inside it is passed to diffusers as is)
        name = _TOY_NAMES[model]
        path = _TOY_FOLDERS[name] / "pipeline"
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"the embedded toy model {name} is missing at {path}; "
                                    f"rebuild it with `{_TOY_BUILD[name]}`")
        return str(path)
    return model


def model_id(model: str | None) -> str:
    if model in _TOY_NAMES:
        return _TOY_NAMES[model]
    if not is_toy(model):
        return str(model)
    inside = Path(str(model)).expanduser().resolve().is_relative_to(TOY_SD3_DIR.resolve())
    return TOY_SD3_ID if inside else TOY_MODEL_ID


def is_toy(model: str | None) -> bool:
    """An embedded toy model (UNet or DiT), by name or by its folder: the one place that decides."""
    if model in _TOY_NAMES:
        return True
    path = Path(str(model)).expanduser()
    return path.exists() and path.resolve().is_relative_to(TOY_MODEL_DIR.resolve())


def check_model(model: str | None) -> None:
    """--model is the toy, an existing diffusers folder, or a valid Hub repo id; else one clear line."""
    if is_toy(model):
        return
    path = Path(str(model)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PatchforgeError(f"--model {model}: a file, not a diffusers pipeline folder")
        if not (path / "model_index.json").exists():
            raise PatchforgeError(f"--model {model}: no model_index.json in this folder: not a diffusers pipeline")
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(model))
    except HFValidationError as err:
        reason = str(err).splitlines()[0].split(". Use `repo_type`")[0].rstrip(".")
        raise PatchforgeError(f"--model {model}: no such folder, and not a Hub repo id ({reason})") from None
    if "/" not in str(model):
        raise PatchforgeError(f"--model {model}: no such folder (a Hub repo id is written owner/name)")


def hub_repo_id(model: str | None) -> str | None:
    """The Hub repo id a base came from: a valid repo id that is no local path and not the toy; else None."""
    if not model or is_toy(model) or Path(str(model)).expanduser().exists():
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(model))
    except HFValidationError:
        return None
    return str(model) if "/" in str(model) else None


LOCAL_MODEL_ID = "local"  # what a file, report or card says of a base loaded from a local folder


def public_model_id(model: str | None) -> str:
    """What a patch, export, report or card may say of a base: the toy's name or the Hub repo id it came
    from. A local folder is never named (its path is private to the machine): it is LOCAL_MODEL_ID."""
    if is_toy(model):
        return model_id(model)
    return hub_repo_id(model) or LOCAL_MODEL_ID


def model_folders(model: str | None) -> list[Path]:
    """Folders that hold a model's files, which no command may write into: its folder, or for a Hub id
    the whole Hub cache (snapshots link into shared blobs)."""
    folders = [f for f in [local_folder(model)] if f is not None]
    if hub_repo_id(model):
        from huggingface_hub import constants

        folders.append(Path(constants.HF_HUB_CACHE))
    return folders


def local_folder(model: str | None) -> Path | None:
    """Where a model's files are before loading: its folder, or a Hub id's cached snapshot; else None."""
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        return path
    if hub_repo_id(model):
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(str(model), "model_index.json")
        if isinstance(index, str):
            return Path(index).parent
    return None


def toy_judge_path() -> Path:
    return TOY_MODEL_DIR / "judges.safetensors"


def pick_device(device: str | None = None) -> torch.device:
    """'cuda' if available, then Apple 'mps', else 'cpu' -- unless the caller says otherwise (checked:
    a device torch does not know, or one this machine lacks, is one line)."""
    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise PatchforgeError(f"--device {str(device)[:40]!r}: not a device (give cpu, cuda, cuda:N or "
                                  f"mps)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not available.get(dev.type, False):
            raise PatchforgeError(f"--device {device}: not available on this machine")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PatchforgeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(model: str | None = None, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a text-to-image pipeline with DiffusionPipeline (SD, SD 2.x, SDXL alike), offline-safe.

    Safety checker and feature extractor are not needed for erasure work and are not loaded."""
    from diffusers import DiffusionPipeline

    path = resolve_model(model)
    if not Path(path).exists() and "/" not in path:
        raise FileNotFoundError(f"no model at '{path}': give a diffusers pipeline folder or a Hub repo id (owner/name)")
    dev = pick_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if "StableDiffusionPipeline" in _class_name(path):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    with _library_bars_off_a_terminal():
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


@contextlib.contextmanager
def _library_bars_off_a_terminal():
    """diffusers' and transformers' loading bars are for terminals: in a log or a pipe they are noise."""
    if sys.stderr.isatty():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _class_name(path: str) -> str:
    index = Path(path) / "model_index.json"
    if index.exists():
        import json
        return json.loads(index.read_text()).get("_class_name", "")
    return ""
