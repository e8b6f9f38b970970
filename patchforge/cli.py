"""The `patchforge` command. Each verb lives in the module that does the work; this file only
dispatches, so `patchforge --help` stays fast (torch and diffusers load only when a verb runs)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PatchforgeError

# verb -> module that defines `register(subparsers)`; register adds the parser and sets `func`
VERBS = {
    "toy": "patchforge.toyworld.commands",
    "generate": "patchforge.generate",
    "train": "patchforge.training",
    "eval": "patchforge.evaluation",
    "attack": "patchforge.attacks",
    "push": "patchforge.hub",
    "pull": "patchforge.hub",
    "export": "patchforge.export",
    "merge": "patchforge.patch_format",
    "demo": "patchforge.demo",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="patchforge", description="Forget patches for text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    verb = next((a for a in argv if not a.startswith("-")), None)
    modules = [VERBS[verb]] if verb in VERBS else list(dict.fromkeys(VERBS.values()))
    for name in modules:
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (PatchforgeError, FileNotFoundError) as err:  # user errors: one line, no traceback
        print(f"patchforge {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
