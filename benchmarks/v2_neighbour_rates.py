"""A quick read of forget patches on a world-v2 toy model: the target's rate on its training and held-out
prompts, and how often its near neighbours are still drawn (held-out prompts, out of sample), plus the
implicit prompts for `implicit:bare`. Cheaper than `patchforge eval` (3 seeds, no attacks, no replacement
table), for comparing a method's settings side by side.

    python benchmarks/v2_neighbour_rates.py models/toy-v2 identity:kiko A.safetensors B.safetensors

MODEL is a v2 build folder (its `pipeline/` and `judges.safetensors`). Prints one line per patch, base first.
"""
import argparse

import numpy as np

from patchforge.pipeline.sampling import generate
from patchforge.core.pipeline_loading import load_pipeline
from patchforge.io.loading import load_forget_patch, unload_forget_patch
from patchforge.toyworld import world_v2 as world
from patchforge.toyworld.judges import Judge

SEEDS = (2000, 2001, 2002)


def prompt_sets(kind: str, name: str) -> dict[str, list[tuple[str, str, str]]]:
    """set -> [(prompt, label kind to read, label expected)]."""
    sets = {split: [(p.prompt, kind, name) for p in world.probes_for(name, split, n=6, seed=0)]
            for split in (world.TRAIN_SPLIT, world.HELDOUT_SPLIT)}
    if kind == "implicit":
        sets["implicit prompts"] = [(p.prompt, kind, name) for p in world.implicit_prompts(12)]
    near = world.NEIGHBOURS.get(name, [])
    if near:  # seed 5: not the eval's neighbour prompts, and never a preserve prompt (held-out split)
        sets["neighbours"] = [(p.prompt, world.kind_of(n), n) for n in near
                              for p in world.probes_for(n, world.HELDOUT_SPLIT, n=2, seed=5)]
    return sets


def rates(pipe, judge, sets) -> dict[str, int]:
    out = {}
    for set_name, rows in sets.items():
        prompts = [p for p, _, _ in rows for _ in SEEDS]
        labels = judge.predict(generate(pipe, prompts, [s for _ in rows for s in SEEDS]))
        hits = [labels[kind][i * len(SEEDS) + j] == name  # a concept's judge label is its name ("bare" too)
                for i, (_, kind, name) in enumerate(rows) for j in range(len(SEEDS))]
        out[set_name] = round(100 * float(np.mean(hits)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a world-v2 build folder (pipeline/ and judges.safetensors)")
    ap.add_argument("concept", help="kind:name, e.g. identity:kiko")
    ap.add_argument("patches", nargs="*")
    args = ap.parse_args()
    kind, name = args.concept.split(":")
    sets = prompt_sets(kind, name.lower())
    pipe = load_pipeline(f"{args.model}/pipeline", device="cpu")
    judge = Judge.load(f"{args.model}/judges.safetensors")
    print("base", rates(pipe, judge, sets), flush=True)
    for path in args.patches:
        load_forget_patch(pipe, path, adapter_name="p")
        print(path, rates(pipe, judge, sets), flush=True)
        unload_forget_patch(pipe, "p")


if __name__ == "__main__":
    main()
