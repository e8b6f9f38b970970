"""The one registry pattern of the plug-in folders (methods/, eval/attacks/): a class registers itself by
name with a decorator, and a package's modules are imported once to find them all, so adding one is
adding a file (no list to edit)."""
from __future__ import annotations

import importlib
import pkgutil
import sys


def registrar(package: str, table: str):
    """`@register(name)` for the dict `package.table`: sets the class's `name` and files it there. The
    dict is looked up when a class registers, so a test may swap it for a copy."""
    def register(name: str):
        def deco(cls):
            cls.name = name
            getattr(sys.modules[package], table)[name] = cls
            return cls
        return deco
    return register


def import_modules(package: str) -> None:
    """Import every module of `package` (its current __path__; tests add a folder to it)."""
    for module in pkgutil.iter_modules(sys.modules[package].__path__):
        importlib.import_module(f"{package}.{module.name}")
