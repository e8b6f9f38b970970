"""Rows of an evaluation: one prompt, how to score it, its generations and their scores.

Shared by `patchforge eval` and `patchforge attack`: both generate rows with the same seeds on the base
and the patched pipeline and ask a judge what each image shows."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import numpy as np

from ..core.concept import KINDS
from ..pipeline.sampling import SEED0, generate
from ..errors import PatchFormatError, one_line
from ..io.loading import load_forget_patch, unload_forget_patch
from ..io.patch_format import K_CONCEPT, K_CONCEPTS, read_patch


@dataclass
class Row:
    """One prompt to generate and how to score it."""
    set: str  # efficacy, generality, neighbour, other_kind, general, attack:<name>
    prompt: str
    concept: str | None = None  # judged present or not (the rate)
    expect: dict = field(default_factory=dict)  # kind -> label for alignment / compositional (toy judge)
    keep: dict = field(default_factory=dict)  # the other attributes that must survive (compositional)


def score(judge, images: np.ndarray, rows: list[Row]) -> dict[str, np.ndarray]:
    """Per image: hit (row.concept shown), aligned (all of row.expect), kept (all of row.keep);
    NaN where a row has nothing to score. A judge that names what it sees (`predict`: kind -> label per
    image) also leaves its labels, as "label:<kind>" arrays: what a patched model drew instead."""
    n = len(rows)
    hit, aligned, kept = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    pred = judge.predict(images) if hasattr(judge, "predict") else None
    for concept in sorted({r.concept for r in rows if r.concept}):
        idx = [i for i, r in enumerate(rows) if r.concept == concept]
        for i, v in zip(idx, judge.detect(images[idx], concept)):
            hit[i] = float(v)
    if pred is not None:
        for i, r in enumerate(rows):
            if r.expect:
                aligned[i] = float(all(pred[k][i] == v for k, v in r.expect.items()))
            if r.keep:
                kept[i] = float(all(pred[k][i] == v for k, v in r.keep.items()))
    labels = {f"label:{k}": np.asarray(v, dtype=object) for k, v in (pred or {}).items()}
    return {"hit": hit, "aligned": aligned, "kept": kept, **labels}


@dataclass
class Generated:
    images: np.ndarray
    scores: dict
    seconds: float


def run_rows(pipe, judge, rows: list[Row], seeds: int) -> Generated:
    prompts = [r.prompt for r in rows for _ in range(seeds)]
    seed_list = [SEED0 + s for _ in rows for s in range(seeds)]
    t0 = time.perf_counter()
    images = generate(pipe, prompts, seed_list)
    seconds = time.perf_counter() - t0
    expanded = [r for r in rows for _ in range(seeds)]
    return Generated(images, score(judge, images, expanded), seconds)


def dedupe(rows_per_patch):
    """Union of rows (by set and prompt) and, per patch, where its rows sit in the union."""
    seen, rows, index = {}, [], []
    for rs in rows_per_patch:
        idx = []
        for r in rs:
            key = (r.set, r.prompt, r.concept)
            if key not in seen:
                seen[key] = len(rows)
                rows.append(r)
            idx.append(seen[key])
        index.append(idx)
    return rows, index


def subset(g: Generated, idx: list[int], seeds: int) -> Generated:
    """The base generations of the rows idx (each row owns `seeds` consecutive images)."""
    img_idx = [i * seeds + s for i in idx for s in range(seeds)]
    frac = len(img_idx) / max(1, len(g.images))
    return Generated(g.images[img_idx], {k: v[img_idx] for k, v in g.scores.items()}, g.seconds * frac)


# ---------------------------------------------------------------- the patch under test
def patch_concepts(path, qualified: bool = False) -> list[str]:
    """The concepts a patch erases, from its metadata: bare names (toy world, where names are unique)
    or, with `qualified`, "kind:name" specs that patchforge.core.concepts.resolve takes (real pipelines)."""
    md = read_patch(path).metadata
    if md.get(K_CONCEPTS):
        entries = _concept_entries(md[K_CONCEPTS], path)
    else:
        specs = [c.strip().split("->")[0] for c in md.get(K_CONCEPT, "")[:MAX_CONCEPTS_TEXT].split(";") if c.strip()]
        entries = [tuple(c.split(":", 1)) if ":" in c else (None, c) for c in specs][:MAX_CONCEPTS]
    for kind, name in entries:
        if kind not in (None, *KINDS) or not CONCEPT_NAME.fullmatch(name):
            raise PatchFormatError(f"{path}: it names the concept {one_line(f'{kind}:{name}', 60)!r}, which is not a "
                                   f"concept name: re-train or re-save the patch")
    return [f"{k}:{n}" if qualified and k else n for k, n in entries]


def patch_targets(path, world) -> list[str]:
    """What eval and attack erase-test: the patch's concepts, each one known to the concept world (the
    toy) when there is one; checked before any model loads, every failure one line."""
    targets = patch_concepts(path, qualified=world is None)
    for target in targets if world else []:
        world.kind_of(target)
    return targets


MAX_CONCEPTS = 256  # a patch erases a list, not a dictionary: eval and attack run rows per concept
MAX_CONCEPTS_TEXT = 64 * 1024
CONCEPT_NAME = re.compile(r"[^{}\x00-\x1f\x7f]{1,200}")


def _concept_entries(raw: str, path) -> list[tuple]:
    """patchforge.concepts (a JSON list of {"kind", "name", ...}) read as untrusted input: bounded, typed."""
    bad = PatchFormatError(f"{path}: its patchforge.concepts metadata is not a list of at most {MAX_CONCEPTS} "
                           f"concepts: re-train or re-save the patch")
    if len(raw) > MAX_CONCEPTS_TEXT:
        raise bad
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(items, list) or not 0 < len(items) <= MAX_CONCEPTS or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("kind"), (str, type(None)))
            for c in items):
        raise bad
    return [(c.get("kind"), c["name"]) for c in items]


def load_patch(pipe, path, weight: float = 1.0) -> tuple[str, float]:
    """Load a patch into pipe at `weight` -> (adapter name, seconds)."""
    t0 = time.perf_counter()
    name = load_forget_patch(pipe, path, weight=weight)
    return name, time.perf_counter() - t0


def unload_patch(pipe, name: str) -> None:
    unload_forget_patch(pipe, name)
