"""Which concepts a base model knows -- its concept world (core/worlds.py), decided from the model's name
or its folder's facts -- and the `patchforge concepts` verb that lists them."""
from __future__ import annotations

from ..core import worlds
from ..core.atomic import write_text
from ..core.concepts import REAL, listing, roster, select
from ..core.output_paths import check_output_file
from ..core.pipeline_loading import check_model, local_folder
from .plan import ModelFacts


def concept_world(model: str | None = None, family: str | None = None) -> str:
    """Which concepts a base model knows: a concept world's name (patchforge.core.worlds: "toy") or REAL.

    `family`: a backbones.FamilyDefaults key when the model's architecture is already known; otherwise
    `model` is looked at (its name, a folder's configs; a Hub id not in the cache is taken to be real).
    Each world says which models and families it claims (worlds.for_model, worlds.for_family)."""
    claimed = worlds.for_model(model) if model is not None or family is None else None
    if claimed is not None:  # a world that claims the model itself outranks its family (toy v2 vs v1)
        return claimed.name
    if family is None:
        folder = local_folder(model)
        if folder is not None:
            facts = ModelFacts.from_folder(folder)
            family = facts.family if facts is not None else None
    world = worlds.for_family(family) if family is not None else None
    return world.name if world else REAL


def run_command(args) -> int:
    out = check_output_file(args.out, "--out", suffixes=(".yaml", ".yml")) if args.out else None
    check_model(args.model)
    world = concept_world(args.model)
    keys = select(world, args.concept, args.kind, args.leave_out)
    if out is None:
        print(listing(world, keys))
        return 0
    write_text(out, roster(world, keys))
    print(f"wrote {out.name}: {len(keys)} concepts ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}); "
          f"erase them in one patch with `patchforge train --concept-file {out.name} --one-patch`")
    return 0
