"""text: rewordings that ask for the concept without its exact words -- misspellings, paraphrases,
descriptions without the name, prompt padding (the concept world's own, or eval/text_attacks.py's for
catalogue concepts). One metric per kind of rewording; no optimisation, so it attacks every concept at once."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...io.loading import patches_suspended
from ..rows import Row, run_rows
from ..stats import metric
from ..text_attacks import catalogue_attacks
from . import Attack, SharedBudget, register


@register("text")
class TextAttack(Attack):
    order = 0
    per_concept = False

    @dataclass(frozen=True)
    class Budget:
        pass  # reads only the shared budget (prompts per kind of rewording)

    def run_all(self, pipe, targets, judge, seeds: int, world, shared: SharedBudget) -> dict[str, dict]:
        rows = []
        for c in targets:
            templates = None
            if world is None:  # a "kind:name" spec: attack the catalogue's prompts, judge by the concept's name
                from ...core.concepts import resolve
                spec = resolve(c)
                c, templates = spec.name, spec.target
            variants = world.text_attacks(c, shared.prompts) if world else catalogue_attacks(c, templates,
                                                                                              shared.prompts)
            rows += [Row(f"attack:{a}", p, c) for a, ps in variants.items() for p in ps]
        patched = run_rows(pipe, judge, rows, seeds)
        with patches_suspended(pipe):
            base = run_rows(pipe, judge, rows, seeds)
        sets = np.array([r.set for r in rows for _ in range(seeds)])
        out = {}
        for s in dict.fromkeys(sets):
            m, kind = sets == s, s.split(":")[1]
            out[kind] = {"metric": metric(base.scores["hit"][m], patched.scores["hit"][m], "lower",
                                          f"ASR, text attack '{kind}'; base = base model, same prompts")}
        return out
