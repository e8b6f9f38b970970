"""Where a command may write: one policy for every verb, checked before any model is loaded.

- A file output (`train --out`, `merge -o`, `export -o` (kohya), `attack --out`, `generate -o`): the
  nearest existing folder above it must be a folder a file can be created in (really tried: permission
  bits say nothing to root or about read-only mounts), an existing file there must be writable, and a
  picture must have a picture's suffix. The file itself is then replaced atomically (core/atomic.py).
- A folder output (`eval --out`, `export --format pipeline -o`): the same, and a folder that is replaced
  as a whole must be empty, missing, or one of patchforge's own earlier outputs (it holds `marker`).
  It may never be the model being read, anything inside it or any folder above it, nor the folder the
  command runs in or one above that: a rename over any of those would destroy the user's files.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import PatchforgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _writable_folder(path: Path, flag: str, shown) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PatchforgeError(f"{flag} {shown}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PatchforgeError(f"{flag} {shown}: cannot write in {probe} ({err.strerror or err})") from None


def check_output_file(out, flag: str, *, folder_ok: bool = False, suffixes: tuple[str, ...] | None = None) -> Path:
    """`out` can be written as a file (folder_ok: or is an existing folder to put the file in)."""
    path = Path(out).expanduser()
    if path.is_dir():
        if not folder_ok:
            raise PatchforgeError(f"{flag} {out}: a folder, not a file")
        _writable_folder(path, flag, out)
        return path
    if suffixes and path.suffix.lower() not in suffixes:
        raise PatchforgeError(f"{flag} {out}: give a file ending in {', '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PatchforgeError(f"{flag} {out}: the file exists and is not writable")
    _writable_folder(path.parent, flag, out)
    return path


def check_output_folder(out, flag: str, *, marker: str | None = None, protect=()) -> Path:
    """`out` can be written as a folder. With `marker` the folder is replaced as a whole, so it must be
    missing, empty or hold `marker` (an earlier output of the same command). `protect`: folders
    (e.g. the model read) that `out` may not be, lie inside or lie above. Returns the resolved path."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise PatchforgeError(f"{flag} {out}: a file, not a folder")
    here = Path.cwd().resolve()
    if marker is not None and (path == here or path in here.parents):
        raise PatchforgeError(f"{flag} {out}: the folder this command runs in (or one above it) cannot be replaced: "
                              f"give a new folder")
    for kept in protect:
        kept = Path(kept).expanduser().resolve()
        if path == kept or kept in path.parents or path in kept.parents:
            where = "is" if path == kept else ("lies inside" if kept in path.parents else "lies above")
            raise PatchforgeError(f"{flag} {out}: {where} the model folder {kept.name!r}, which is never written to: "
                                  f"give a new folder")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise PatchforgeError(f"{flag} {out}: the folder is not empty and is not an earlier patchforge output: "
                              f"give a new folder (nothing was written)")
    _writable_folder(path if path.exists() else path.parent, flag, out)
    return path
