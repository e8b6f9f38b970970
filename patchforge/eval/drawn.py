"""What a patched model draws, as its users see it (part of `patchforge eval`).

    replacement.*   on the target's own prompts (efficacy + generality rows): what appears where the
                    concept was asked for -- the concept itself (kept), its neutral replacement, a
                    protected neighbour, another concept of its kind, or nothing of its kind (absent).
                    The five shares add up to 1 for base and for patched.
    replacement_heldout.*  the same shares on the target prompts the patch never trained on only
                    (replacement.* mixes training and held-out prompts; a patch can behave differently on
                    prompts it has not seen)
    unprompted.*    on prompts that never ask for it (general, neighbour, other-kind rows): how often the
                    erased concept shows up anyway, and how often another concept of its kind shows up
                    that the prompt did not ask for.
    side_effect.<kind>.<label>  on the target's own prompts: every other concept, of any kind the judge
                    names, that the patched model draws more often than the base where the prompt did not
                    ask for it (the neutral replacement excepted: it is meant to appear)

Both need a judge that names what it sees (`predict`: kind -> label per image, left in the scores as
"label:<kind>" by rows.score) and a concept world that knows each concept's kind, neighbours and neutral
replacement (patchforge.core.worlds). Without them there is nothing to report and both return {}.
Every number is a base vs patched pair on the same images' prompts and seeds (stats.metric).
"""
from __future__ import annotations

import numpy as np

from .rows import Generated
from .stats import metric

TARGET_SETS = ("efficacy", "generality")
UNASKED_SETS = ("general", "neighbour", "other_kind")
CATEGORIES = {  # replacement category -> (better, what)
    "kept": ("lower", "the concept itself (efficacy and generality rows together)"),
    "neutral": ("higher", "its neutral replacement (the patch's `to` if it names one, else the world's)"),
    "neighbour": ("lower", "a protected near neighbour of the same kind"),
    "other": ("neither", "another concept of the same kind"),
    "absent": ("neither", "nothing of its kind the judge can name (e.g. no shape at all, a character instead)"),
}


def neutrals(world, targets: list[str], tos: dict[str, str | None]) -> dict[str, dict]:
    """Per target: the judge label that counts as its neutral replacement and where it comes from.
    A `to` recorded in the patch wins when the judge can see it (a concept of the kind, or the world's
    neutral label); a `to` the judge has no label for ("a blob") leaves no neutral to count."""
    out = {}
    for c in targets:
        kind = world.kind_of(c)
        own = world.neutral(c)[1].get(kind)
        to = (tos.get(c) or "").strip().lower()
        if to:
            out[c] = {"label": to if to in world.known_names(kind) or to == own else None, "from": "to", "to": to}
        else:
            out[c] = {"label": own, "from": "world", "to": None}
        out[c]["neighbours"] = world.neighbours(c)
    return out


def category(world, concept: str, label: str, neutral: str | None) -> str:
    """Where an image asked to show `concept` landed, given the judge's label of its kind."""
    if label == concept:
        return "kept"
    if neutral is not None and label == neutral:
        return "neutral"  # before neighbour: a patch trained `--to` a neighbour lands where it was sent
    if label in world.neighbours(concept):
        return "neighbour"
    if label in world.known_names(world.kind_of(concept)):
        return "other"
    return "absent"


def _labels(g: Generated, kind: str):
    return g.scores.get(f"label:{kind}")


def replacement(world, rows, seeds: int, base: Generated, patched: Generated, neutral: dict[str, dict],
                only: list[bool] | None = None, prefix: str = "replacement") -> dict:
    """<prefix>.<category>: share of the target's own images that show each category. `only`: per row,
    whether it counts (default: all)."""
    expanded = [r for r in rows for _ in range(seeds)]
    counted = [o for o in (only if only is not None else [True] * len(rows)) for _ in range(seeds)]
    picked = [i for i, r in enumerate(expanded) if r.set in TARGET_SETS and counted[i]]
    if world is None or not picked or any(_labels(g, world.kind_of(expanded[i].concept)) is None
                                          for g in (base, patched) for i in picked):
        return {}
    cats = {}
    for which, g in (("base", base), ("patched", patched)):
        cats[which] = np.array([category(world, expanded[i].concept, _labels(g, world.kind_of(expanded[i].concept))[i],
                                         neutral[expanded[i].concept]["label"]) for i in picked])
    return {f"{prefix}.{c}": metric((cats["base"] == c).astype(float), (cats["patched"] == c).astype(float),
                                       better, f"target prompts drawing {what}")
            for c, (better, what) in CATEGORIES.items()}


def _asked(row, kind: str) -> str | None:
    """What a prompt asks for of `kind`: the label it names; "none" where the kind cannot apply (a
    character prompt has no shape, colour or style; a shape prompt no character); None where the
    prompt leaves it open (a shape prompt naming no colour: any colour is the model's free choice)."""
    if kind in row.expect:
        return row.expect[kind]
    character = "identity" in row.expect
    return "none" if character != (kind == "identity") else None


def unprompted(world, rows, seeds: int, base: Generated, patched: Generated, targets: list[str]) -> dict:
    """unprompted.target and unprompted.other_same_kind on the prompts that never ask for a target."""
    if world is None:
        return {}
    kinds = sorted({world.kind_of(c) for c in targets})
    if any(_labels(g, k) is None for g in (base, patched) for k in kinds):
        return {}
    expanded = [r for r in rows for _ in range(seeds)]
    picked = [i for i, r in enumerate(expanded) if r.set in UNASKED_SETS]
    names = {k: set(world.known_names(k)) - set(targets) for k in kinds}

    def flags(g: Generated):
        target = np.array([float(any(_labels(g, world.kind_of(c))[i] == c for c in targets)) for i in picked])
        other = np.full(len(picked), np.nan)  # NaN: every open kind -> nothing was asked, nothing to count
        for j, i in enumerate(picked):
            asked = {k: _asked(expanded[i], k) for k in kinds}
            if any(a is not None for a in asked.values()):
                other[j] = float(any(a is not None and _labels(g, k)[i] in names[k] and _labels(g, k)[i] != a
                                     for k, a in asked.items()))
        return target, other

    (bt, bo), (pt, po) = flags(base), flags(patched)
    kind_words = " / ".join(kinds)
    return {"unprompted.target": metric(bt, pt, "lower", "erased concept shown on prompts that never ask for it "
                                                           "(general, neighbour, other-kind)"),
            "unprompted.other_same_kind": metric(bo, po, "lower", f"another {kind_words} than the prompt asked for "
                                                                  "shown (prompts that fix it)")}


def side_effects(world, rows, seeds: int, base: Generated, patched: Generated, targets: list[str],
                 neutral: dict[str, dict]) -> dict:
    """side_effect.<kind>.<label> for every concept (any kind the judge names, the targets and their neutral
    replacements excepted) that the patched model shows on the target's own prompts more often than the
    base did, counted on the images whose prompt did not ask for that kind's label."""
    if world is None:
        return {}
    expanded = [r for r in rows for _ in range(seeds)]
    picked = [i for i, r in enumerate(expanded) if r.set in TARGET_SETS]
    kinds = [k.split(":", 1)[1] for k in patched.scores if k.startswith("label:") and k in base.scores]
    skip = set(targets) | {t["label"] for t in neutral.values() if t.get("label")}
    out = {}
    for kind in kinds:
        b, p = _labels(base, kind), _labels(patched, kind)
        for label in sorted(set(world.known_names(kind)) - skip):
            # images whose prompt neither asks for this label nor rules the kind out (a character has no shape)
            rows_here = [i for i in picked if _asked(expanded[i], kind) not in ("none", label)]
            if not rows_here:
                continue
            bb = np.array([float(b[i] == label) for i in rows_here])
            pp = np.array([float(p[i] == label) for i in rows_here])
            if pp.mean() > bb.mean():
                out[f"side_effect.{kind}.{label}"] = metric(
                    bb, pp, "lower", f"{label} ({kind}) drawn on the target's prompts that did not ask for it")
    return out
