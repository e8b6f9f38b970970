"""patchforge: forget patches for text-to-image diffusion models.

Importing patchforge changes nothing in diffusers; pipelines gain patch methods only through an
explicit opt-in (see docs/usage.md).
"""
__version__ = "0.1.0"

# Public API, imported on first use so `import patchforge` stays light (no torch, no diffusers)
_LAZY = {
    "load_forget_patch": "patchforge.io.loading",
    "enable": "patchforge.io.loading",
    "list_forget_patches": "patchforge.io.loading",
    "set_forget_patch_weight": "patchforge.io.loading",
    "unload_forget_patch": "patchforge.io.loading",
    "unload_forget_patches": "patchforge.io.loading",
    "fuse_forget_patches": "patchforge.io.loading",
    "unfuse_forget_patches": "patchforge.io.loading",
    "bake_forget_patches": "patchforge.io.loading",
    "without_patches": "patchforge.io.loading",
    "save_patch_from_pipeline": "patchforge.io.patch_format",
    "read_patch": "patchforge.io.patch_format",
    "merge_patches": "patchforge.io.patch_format",
    "write_patch": "patchforge.io.patch_format",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        from .compat import check_installed_stack

        check_installed_stack()  # a known-broken set of libraries fails here in one line, not deep inside PEFT
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchforge' has no attribute {name!r}")
