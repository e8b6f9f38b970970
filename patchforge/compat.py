"""Known-broken combinations of the libraries patchforge stands on, caught at first use.

A fresh `pip install` takes whatever was released that morning. When upstream releases break each
other, the failure surfaces deep inside transformers or PEFT as a traceback about something the user
never called. This module reads the installed versions from package metadata (cheap: nothing is
imported) and turns a known-bad combination into one line that names the versions and the fix.

Add a row to BROKEN when a new incompatibility is found; remove it when the lower bound in
pyproject.toml makes it impossible.
"""
from __future__ import annotations

import re
from importlib import metadata

from .errors import PatchforgeError

# (package, first bad version, other package, first good version of it, what breaks)
BROKEN = [
    ("transformers", (5, 24), "peft", (0, 22),
     "transformers refuses to load a text-encoder LoRA through an older PEFT"),
]
FIX = "pip install 'transformers<5.24' (or install the tested set: pip install -c constraints.txt patchforge)"


def _version(package: str) -> tuple[int, ...] | None:
    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    # release numbers only: "5.24.0rc1+cpu" -> (5, 24, 0); pre-releases count as their release
    release = re.match(r"[\d.]*\d", text)
    return tuple(int(n) for n in release.group().split(".") if n) if release else None


def incompatibilities() -> list[str]:
    """One sentence per known-broken combination that is installed now (empty when all is well)."""
    found = []
    for package, bad_from, other, good_from, what in BROKEN:
        mine, theirs = _version(package), _version(other)
        if mine is not None and theirs is not None and mine >= bad_from and theirs < good_from:
            found.append(f"{package} {metadata.version(package)} with {other} {metadata.version(other)}: {what} "
                         f"({package} >= {'.'.join(map(str, bad_from))} needs {other} >= "
                         f"{'.'.join(map(str, good_from))})")
    return found


def check_installed_stack() -> None:
    """Raise one PatchforgeError line if a known-incompatible set of libraries is installed."""
    found = incompatibilities()
    if found:
        raise PatchforgeError(f"incompatible libraries installed: {'; '.join(found)}. Fix: {FIX}")
