"""The bottom of patchforge's import graph: small shared types every wing uses (conditioning, the
adapter's name and LoRA helpers, caches, metric statistics). Modules here import nothing of
patchforge but errors/atomic, so every other module may import them and imports only run downward."""
