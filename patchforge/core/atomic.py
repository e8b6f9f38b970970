"""Atomic file writes: a half-written file (Ctrl-C, full disk, a crash) never replaces a good one.

Every file patchforge writes -- patches, reference caches, judges, pictures, reports -- goes through
`atomic_path`: the content is written to a temporary file in the same folder, then renamed over the
target in one step (`os.replace` is atomic on POSIX and Windows within one file system). The data
is fsynced before the rename and the folder after it, so a power cut leaves the old file or the new
one, never an empty one. Temporary names carry the writer's process id, so that what a killed
writer left behind (`kill -9`: no cleanup runs; with a real model that is gigabytes) is removed by the
next write to the same target.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is
    removed and `path` is left as it was. The temporary name keeps the suffix (PIL picks the image
    format from it) and starts with a dot, so a glob for `*.safetensors` never sees it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; ours are meant to be shared
        _fsync(tmp)  # the data on disk before the name points at it
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)  # and the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def _prefix(path: Path) -> str:
    return f".{path.name}.pf{os.getpid()}."


def _sweep(path: Path) -> None:
    """Remove the temporary files and folders that writers of `path` left when they were killed: names
    made by _prefix whose process is gone."""
    mine = re.compile(rf"\.{re.escape(path.name)}\.pf(\d+)\..+\.(tmp.*|old)$")
    for leftover in path.parent.iterdir():
        found = mine.match(leftover.name)
        if not found or _alive(int(found.group(1))):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync(path: Path, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        if folder:  # Windows cannot open folders; its rename is already durable
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on a clean exit it becomes `path` (an old `path` is
    moved aside first and removed after), on an error it is removed and `path` is left as it was.
    Two renames, not one: a folder cannot replace a non-empty folder in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes folders owner-only
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
