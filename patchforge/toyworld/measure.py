"""How good is the toy model? Judge accuracy on real images, and how often base-model
generations show what the prompt asked for, per concept kind, on training-style prompts and on
held-out paraphrases. Fixed seeds; the numbers behind docs/toy-model.md."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text
from ..pipeline.sampling import GUIDANCE, STEPS, generate, to_grid  # one generation path for every measurement
from ..core.pipeline_loading import load_pipeline, toy_judge_path
from . import world
from .judges import WORLDS, Judge, identity_accuracy_by_art, judge_accuracy



def concept_rates(pipe, judge: Judge, split: str, seeds: int, batch: int = 64, wm=world) -> dict[str, dict[str, float]]:
    """For every concept of world `wm`: share of generations whose judged label matches the asked-for
    one, for its own kind."""
    rows = []
    for kind in wm.KINDS:
        for name in wm.concepts_of(kind):
            for i, probe in enumerate(wm.probes_for(name, split, n=seeds, seed=0)):
                rows.append((kind, name, probe, 1000 + i))
    hits: dict[str, list[bool]] = {}
    for start in tqdm(range(0, len(rows), batch), desc=f"generate ({split})", disable=None):
        chunk = rows[start:start + batch]
        images = generate(pipe, [r[2].prompt for r in chunk], [r[3] for r in chunk])
        pred = judge.predict(images)
        for j, (kind, name, probe, _) in enumerate(chunk):
            hits.setdefault(name, []).append(pred[kind][j] == name)
    return {n: float(np.mean(v)) for n, v in hits.items()}


def base_model_report(model: str | None = None, seeds: int = 8) -> dict:
    t0 = time.time()
    pipe = load_pipeline(model, device="cpu")
    # a model rebuilt elsewhere (`toy train --out DIR`, then --model DIR/pipeline) is judged by its own judges
    own = Path(model).parent / "judges.safetensors" if model else None
    judge = Judge.load(own if own is not None and own.exists() else toy_judge_path())
    wm = WORLDS[judge.net.world_name]  # the judges say which world the model was built from
    out = {"world": judge.net.world_name, "judge_accuracy_real": judge_accuracy(judge),
           "identity_accuracy_by_art": identity_accuracy_by_art(judge), "seeds_per_concept": seeds,
           "guidance": GUIDANCE, "steps": STEPS, "rates": {}}
    for split in (world.TRAIN_SPLIT, world.HELDOUT_SPLIT):
        out["rates"][split] = concept_rates(pipe, judge, split, seeds, wm=wm)
    out["by_kind"] = {split: {k: float(np.mean([out["rates"][split][n] for n in wm.concepts_of(k)]))
                              for k in wm.KINDS} for split in out["rates"]}
    if wm is not world:  # v2: how often the implicit concept shows on prompts that never name it
        probes = wm.implicit_prompts(2 * seeds * len(wm.IMPLICIT_CONTEXTS))
        images = generate(pipe, [p.prompt for p in probes], [1000 + i for i in range(len(probes))])
        out["implicit_prompts_rate"] = float(np.mean([x == wm.BARE for x in judge.predict(images)["implicit"]]))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def format_report(r: dict) -> str:
    lines = ["| kind | judge accuracy (held-out real images) | base rate, training prompts "
             "| base rate, held-out paraphrases |",
             "|---|---|---|---|"]
    wm = WORLDS[r.get("world", "v1")]
    kinds = list(r["by_kind"]["train"])
    for k in kinds:
        lines.append(f"| {k} | {r['judge_accuracy_real'][k]:.1%} | {r['by_kind']['train'][k]:.1%} "
                     f"| {r['by_kind']['heldout'][k]:.1%} |")
    if r.get("identity_accuracy_by_art"):
        lines.append("\nidentity judge on real images of named characters, per art style: "
                     + ", ".join(f"{a} {v:.1%}" for a, v in r["identity_accuracy_by_art"].items()))
    if "implicit_prompts_rate" in r:
        lines.append(f"\nimplicit concept on its implicit prompts (never named): {r['implicit_prompts_rate']:.1%}")
    lines += ["", "| concept | training prompts | held-out paraphrases |", "|---|---|---|"]
    for k in kinds:
        for n in wm.concepts_of(k):
            lines.append(f"| {k}:{n} | {r['rates']['train'][n]:.0%} | {r['rates']['heldout'][n]:.0%} |")
    lines.append(f"\n{r['seeds_per_concept']} seeds per concept and split, guidance {r['guidance']}, "
                 f"{r['steps']} sampler steps; {r['seconds']} s.")
    return "\n".join(lines)


def concept_grid(pipe, path, seeds: int = 6) -> None:
    """A picture for people: rows are concepts (one training-style prompt each), columns seeds."""
    prompts = []
    for kind in world.KINDS:
        for name in world.concepts_of(kind):
            prompts.append(world.probes_for(name, world.TRAIN_SPLIT, n=1, seed=0)[0].prompt)
    images = generate(pipe, [p for p in prompts for _ in range(seeds)], [s for _ in prompts for s in range(seeds)])
    with atomic_path(path) as tmp:
        to_grid(images, seeds, min_side=64).save(tmp)
    write_text(Path(path).with_suffix(".txt"), "rows, top to bottom:\n" + "\n".join(prompts) + "\n")


def world_grid(path, per_concept: int = 6, seed: int = 0) -> None:
    """Real renders, no model: one row per concept, each showing it with random other attributes
    (docs/toy-world.png)."""
    import random

    rng, images = random.Random(seed), []
    for kind in world.KINDS:
        for name in world.concepts_of(kind):
            for _ in range(per_concept):
                s = world.random_scene(rng, identity_share=1.0 if kind == "identity" else 0.0)
                s = replace(s, identity=name) if kind == "identity" else replace(s, **{kind: name})
                images.append(world.render(s, rng.randrange(1 << 30)))
    with atomic_path(path) as tmp:
        to_grid(np.stack(images), per_concept, min_side=64).save(tmp)


def world_v2_sheet(path, seed: int = 0) -> None:
    """Real world-v2 renders, no model (docs/toy-world-v2.png). Rows: the 24 identities (two rows, each
    in the 6 x 4 species-by-tint order), each art style on random scenes, each background with a
    character, bare characters in their contexts, and two-subject scenes."""
    import random

    from . import world_v2 as w

    rng, rows = random.Random(seed), []
    names = list(w.IDENTITIES)
    rows += [[w.Scene(identity=n, size=20) for n in names[:12]], [w.Scene(identity=n, size=20) for n in names[12:]]]
    for art in w.ART:
        rows.append([replace(w.random_scene(rng), art=art) for _ in range(12)])
    rows.append([replace(w.random_scene(rng, 1.0), background=b, implicit=w.NONE)
                 for b in list(w.BACKGROUNDS) * 2 + [w.PLAIN, w.PLAIN]])
    rows.append([replace(w.random_scene(rng, 1.0), background=w.IMPLICIT_CONTEXTS[i % 2], implicit=w.BARE, art=w.NONE)
                 for i in range(12)])
    rows.append([replace(w.random_scene(rng), art=w.NONE) for _ in range(12)])
    images = np.stack([w.render(s) for row in rows for s in row])  # noise-free: a small file
    with atomic_path(path) as tmp:
        to_grid(images, 12, min_side=64).save(tmp)
