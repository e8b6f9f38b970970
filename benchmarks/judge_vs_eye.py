"""How well do the toy judges read *generated* images? Compared with a person's eye.

Real renders are easy (the judges score ~100% on them); generations are blurrier, speckled and
sometimes faint, and every erasure number depends on the judge reading them right. So an engineer
labels a fixed sheet of base-model generations by eye, and this script scores the judge against
those labels, per kind.

    python benchmarks/judge_vs_eye.py sheet  docs/judge-eye-sheet.png   # numbered picture to label
    python benchmarks/judge_vs_eye.py score  docs/judge-eye-labels.json # judge vs the hand labels
    python benchmarks/judge_vs_eye.py sheet  docs/judge-eye-colour-sheet.png --set colour
    python benchmarks/judge_vs_eye.py score  docs/judge-eye-colour-labels.json
    python benchmarks/judge_vs_eye.py sheet  docs/judge-eye-v2-sheet.png --set v2-identity \
        --model models/toy-v2/pipeline
    python benchmarks/judge_vs_eye.py score  docs/judge-eye-v2-labels.json --model models/toy-v2/pipeline \
        --judge models/toy-v2/judges.safetensors

The general sheet (--set general) asks for every kind at once. The colour sheet (--set colour) asks
for each colour 8 times on random shapes and textures, in shuffled order, because the warm colours
(red / orange / yellow / pink) are where generations drift between names and the general sheet
holds too few of them to say which way the judge errs. The world-v2 sheet (--set v2-identity) asks
for a named character in each rendering style (none, then v2's art styles), 8 each, and is scored per
style: a judge that misses stylised characters makes identity erasure look easier than it is.

The labels file maps image number -> {"object", "color", "style"} or {"identity"} as seen; "?"
means the labeller could not tell, and is left out of the score. The sheet is regenerated from
fixed prompts and seeds, so the labels stay tied to the same images as long as the model is.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from patchforge.eval.evaluation import generate
from patchforge.toyworld.plugin import ToyJudge
from patchforge.core.pipeline_loading import load_pipeline
from patchforge.toyworld import world

N_SHAPES, N_CHARACTERS, SEED = 40, 8, 2024
V2_PER_STYLE, V2_SEED = 8, 4040
COLOUR_REPEATS, COLOUR_SEED = 8, 3030


def sheet_prompts(which: str = "general") -> list[str]:
    """Fully specified prompts, so the labeller knows what was asked, and the judge must read all kinds."""
    if which == "v2-identity":
        from patchforge.toyworld import world_v2

        rng = random.Random(V2_SEED)
        names = list(world_v2.IDENTITIES)
        return [f"a photo of {rng.choice(names).capitalize()}" + (f", {art} artwork" if art else "")
                for art in [None, *world_v2.ART] for _ in range(V2_PER_STYLE)]
    if which == "colour":
        rng = random.Random(COLOUR_SEED)
        prompts = []
        for col in list(world.COLORS) * COLOUR_REPEATS:
            obj, style = rng.choice(list(world.OBJECTS)), rng.choice(list(world.STYLES) + [world.SOLID])
            prompts.append(f"a {col} {obj}" + ("" if style == world.SOLID else " " + world.style_phrase(style)))
        rng.shuffle(prompts)
        return prompts
    rng = random.Random(SEED)
    prompts = []
    for _ in range(N_SHAPES):
        obj, col = rng.choice(list(world.OBJECTS)), rng.choice(list(world.COLORS))
        style = rng.choice(list(world.STYLES) + [world.SOLID])
        prompts.append(f"a {col} {obj}" + ("" if style == world.SOLID else " " + world.style_phrase(style)))
    prompts += [f"a picture of {rng.choice(list(world.IDENTITIES))}" for _ in range(N_CHARACTERS)]
    return prompts


def images(model=None, which: str = "general"):
    prompts = sheet_prompts(which)
    first = {"colour": COLOUR_SEED, "v2-identity": V2_SEED}.get(which, SEED)
    return prompts, generate(load_pipeline(model, device="cpu"), prompts, [first + i for i in range(len(prompts))])


def write_sheet(path: Path, model=None, which: str = "general") -> None:
    prompts, ims = images(model, which)
    cols, cell = 8, 32 * 4 + 18
    sheet = Image.new("RGB", (cols * cell, -(-len(ims) // cols) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(ims):
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(Image.fromarray(im).resize((128, 128), Image.NEAREST), (x + 2, y + 16))
        draw.text((x + 2, y + 2), str(i), fill=(0, 0, 0))
    sheet.save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(f"{i}: {p}" for i, p in enumerate(prompts)) + "\n")
    print(f"wrote {path} and its prompt list; label what you SEE, not what was asked")


def score(labels_path: Path, model=None, judge=None) -> None:
    data = json.loads(Path(labels_path).read_text())
    labels = {int(k): v for k, v in data["labels"].items()}
    prompts, ims = images(model, data.get("sheet", "general"))
    if data.get("sheet") == "v2-identity":
        return score_by_style(labels, prompts, ToyJudge(judge).judge.predict(ims))
    pred = ToyJudge(judge).judge.predict(ims)
    print("| kind | judge agrees with the eye | images | prompt asked for it and the eye saw it |")
    print("|---|---|---|---|")
    disagreements = []
    for kind in world.KINDS:
        pairs = [(i, lab[kind]) for i, lab in labels.items() if kind in lab and lab[kind] != "?"]
        agree = [pred[kind][i] == seen for i, seen in pairs]
        asked = [world.kind_of(seen) == kind and seen in prompts[i].split() for i, seen in pairs
                 if seen not in (world.NONE, world.SOLID)]
        disagreements += [f"{i} {kind}: eye {seen}, judge {pred[kind][i]}"
                          for (i, seen), a in zip(pairs, agree) if not a]
        print(f"| {kind} | {np.mean(agree):.0%} | {len(pairs)} | {np.mean(asked) if asked else float('nan'):.0%} |")
    print("\ndisagreements:", "; ".join(disagreements) or "none")


def score_by_style(labels: dict, prompts: list[str], pred: dict) -> None:
    """World v2: identity and species, judge against the eye, per rendering style."""
    print("| rendering style | identity: judge agrees with the eye | species: agrees | images "
          "| eye saw the asked-for character |")
    print("|---|---|---|---|---|")
    disagreements = []
    for i0 in range(0, len(prompts), V2_PER_STYLE):
        rows = [i for i in range(i0, i0 + V2_PER_STYLE) if i in labels]
        style = prompts[i0].split(", ")[1].split()[0] if ", " in prompts[i0] else "none"
        cells = []
        for kind in ("identity", "species"):
            pairs = [(i, labels[i][kind]) for i in rows if labels[i].get(kind, "?") != "?"]
            cells.append(np.mean([pred[kind][i] == seen for i, seen in pairs]) if pairs else float("nan"))
            disagreements += [f"{i} {kind}: eye {seen}, judge {pred[kind][i]}"
                              for i, seen in pairs if pred[kind][i] != seen]
        asked = np.mean([labels[i].get("identity") == prompts[i].split()[3].strip(",").lower() for i in rows])
        print(f"| {style} | {cells[0]:.0%} | {cells[1]:.0%} | {len(rows)} | {asked:.0%} |")
    print("\ndisagreements:", "; ".join(disagreements) or "none")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["sheet", "score"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--model", default=None, help="toy model folder (default: the shipped one)")
    ap.add_argument("--judge", default=None, help="judges.safetensors (default: the shipped one)")
    ap.add_argument("--set", default="general", choices=["general", "colour", "v2-identity"],
                    help="which sheet to draw (sheet mode)")
    args = ap.parse_args()
    write_sheet(args.path, args.model, args.set) if args.mode == "sheet" else score(args.path, args.model, args.judge)
    sys.exit(0)
