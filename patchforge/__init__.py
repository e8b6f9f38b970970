"""patchforge: forget patches for text-to-image diffusion models.

Importing patchforge changes nothing in diffusers; pipelines gain patch methods only through an
explicit opt-in (see docs/usage.md).
"""
__version__ = "0.1.0"
