"""Where patchforge caches what it derives from a base model (reference latents, Fisher)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHFORGE_CACHE") or Path.home() / ".cache" / "patchforge")

