"""The toy world as a concept world (patchforge.core.worlds): its concepts as training prompt sets, its eval
prompt sets and attacks, its real images and its judge.

Toy concepts are built ONLY from the world's canonical training split (canonical names and templates).
Its aliases and paraphrase templates are held out: they measure whether an erasure generalises, so a
method must never see them. Heavy parts (the judge's CNN, eval rows) are imported when first used, so
training code that resolves a toy concept never loads a judge."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

from ..core.concept import ConceptSpec, mentions
from ..errors import PatchforgeError
from ..core.pipeline_loading import is_toy, toy_judge_path
from ..eval.text_attacks import PADDING, article_free, misspell, replace_word
from . import world

N_TARGET = 16  # training prompts per toy concept (the world makes them; cheap)
N_PRESERVE = 4  # prompts per preserved concept
JUDGE_FILE = "judges.safetensors"  # beside a toy-world pipeline folder


class ToyJudge:
    """The toy world's judge: one CNN head per concept kind, concept shown iff its head says so."""

    name = "toy-judge"

    def __init__(self, path=None):
        from .judges import Judge

        self.path = Path(path) if path else toy_judge_path()
        if not self.path.exists():
            raise PatchforgeError(f"no toy judge at {self.path}: rebuild the toy model with `patchforge toy train`")
        self.judge = Judge.load(self.path)

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        """kind -> predicted label per image (all four heads at once)."""
        return self.judge.predict(np.asarray(images))

    def detect(self, images: np.ndarray, concept: str) -> list[bool]:
        kind = world.kind_of(concept)
        return [label == concept for label in self.predict(images)[kind]]

    def features(self, images: np.ndarray) -> np.ndarray:
        """The judge's penultimate features: the space of our Fréchet distance."""
        return self.judge.features(np.asarray(images)).numpy().astype(np.float64)


class ToyWorld:
    name = "toy"

    # ---- models
    def knows_model(self, model) -> bool:
        """The embedded toy model, or a toy-world pipeline folder (its judges lie beside it)."""
        return is_toy(model) or (model is not None and (Path(str(model)).parent / JUDGE_FILE).exists())

    def knows_family(self, family: str) -> bool:
        """Toy-sized models (sizes no SD release has: the toy, the tests' tiny pipelines) use its tokenizer."""
        from ..core.plan import TOY_FAMILY

        return family == TOY_FAMILY

    def judge(self, arg: str | None = None) -> ToyJudge:
        return ToyJudge(arg or None)

    def default_judge(self, model) -> ToyJudge:
        """The judge beside a toy pipeline folder, or the embedded one."""
        return ToyJudge(None if is_toy(model) else Path(str(model)).parent / JUDGE_FILE)

    # ---- concepts (training)
    def known_names(self, kind: str) -> list[str]:
        return list(world.concepts_of(kind)) if kind in world.KINDS else []

    def resolve(self, kind: str, name: str, to: str | None, seed: int) -> ConceptSpec | None:
        if kind not in world.KINDS or name.lower() not in world.concepts_of(kind):
            return None
        name = name.lower()
        probes = world.probes_for(name, world.TRAIN_SPLIT, n=N_TARGET, seed=seed)
        target = list(dict.fromkeys(p.prompt for p in probes))  # unique, order kept
        # The alternative: a toy concept of the same kind if --to names one, else free words, else the
        # concept simply removed (style -> solid; colour/identity -> unnamed; object -> "shape").
        alt = to
        if to and to.lower() in world.concepts_of(kind):
            alt = to.lower()
        words = [name, name.capitalize()] if kind == "identity" else [name]
        anchor = [_replace(p, kind, name, alt) for p in target]
        # Preserve: the neighbours first (what an erasure damages most), then one concept of every
        # other kind, all on canonical prompts; never a prompt that names the target itself.
        keep = [n for n in world.NEIGHBOURS.get(name, [])]
        for k in world.KINDS:
            others = [c for c in world.concepts_of(k) if c != name and c not in keep]
            keep += others[:2] if k != kind else others[:1]
        preserve = []
        for other in keep:
            for p in world.probes_for(other, world.TRAIN_SPLIT, n=N_PRESERVE, seed=seed + 1):
                if not mentions(p.prompt, name):
                    preserve.append(p.prompt)
        near = world.NEIGHBOURS.get(name, [])
        contrast = [_replace(p, kind, name, near[i % len(near)]) if near else None for i, p in enumerate(target)]
        return ConceptSpec(kind, name, target, anchor, list(dict.fromkeys(preserve)), to=to, words=words,
                           world=self.name, contrast=contrast)

    def neutral(self, concept: str) -> tuple[str | None, dict]:
        """What an erasure of `concept` should leave in its place: (prompt words, or None when the concept
        is simply left out; judge labels kind -> label a neutral replacement shows, {} when the kind has
        no neutral). See world.neutral."""
        return world.neutral(concept.lower())

    def general_prompts(self) -> list[str]:
        """One canonical prompt of every toy concept."""
        return [world.probes_for(n, world.TRAIN_SPLIT, 1, 0)[0].prompt
                for k in world.KINDS for n in world.concepts_of(k)]

    # ---- evaluation and attacks
    def eval_rows(self, targets: list[str], n: int = 6, avoid: set[str] | None = None) -> list:
        """The toy world's prompt sets for an erasure of `targets` (deterministic). `avoid`: the prompts the
        patch trained on; each neighbour / other-kind concept then gets as many fresh prompts (other seeds,
        then the base model's own caption mix) as it has rows among them, so its prompts outside `avoid`
        are as many as it has rows (the in-sample rows stay, reported apart)."""
        from ..eval.rows import Row

        rows = []
        clean = lambda text: not any(world.names_concept(text, c) for c in targets)  # noqa: E731
        for c in targets:
            kind = world.kind_of(c)
            for p in world.probes_for(c, world.TRAIN_SPLIT, n=n, seed=0):  # the first n of the training prompts
                keep = {k: v for k, v in p.expect.items() if k != kind and v not in targets}
                rows.append(Row("efficacy", p.prompt, c, p.expect, keep))
            for p in world.probes_for(c, world.HELDOUT_SPLIT, n=n, seed=0):
                rows.append(Row("generality", p.prompt, c, p.expect))
            for nb in [x for x in world.NEIGHBOURS[c] if x not in targets]:
                rows += _kept_rows("neighbour", nb, max(2, n // 2), clean, avoid)
            for other_kind in [k for k in world.KINDS if k != kind]:
                other = next((x for x in world.concepts_of(other_kind)[1:] + world.concepts_of(other_kind)[:1]
                              if x not in targets), None)
                if other is None:  # every concept of that kind is erased (all four identities): none to keep
                    continue
                rows += _kept_rows("other_kind", other, max(2, n // 2), clean, avoid)
            for attack, probes in self.text_attacks(c, n=max(2, n // 2)).items():
                rows += [Row(f"attack:{attack}", p, c) for p in probes]
        rng = random.Random("general")  # general prompts: random scenes that do not involve the targets
        general = []
        while len(general) < 2 * n:
            scene = world.random_scene(rng)
            if any(scene.label(world.kind_of(c)) == c for c in targets):
                continue
            text = world.caption(scene, rng, split=world.TRAIN_SPLIT, drop=0.3)
            if not clean(text):
                continue
            expect = {k: scene.label(k) for k in world.KINDS if world.mentions(text, scene, k)}
            general.append(Row("general", text, None, expect))
        return rows + general

    def kind_of(self, concept: str) -> str:
        """The kind of a toy concept (the judge head that sees it)."""
        return world.kind_of(concept.lower())

    def neighbours(self, concept: str) -> list[str]:
        """The near neighbours an erasure of `concept` must keep (world.NEIGHBOURS)."""
        return list(world.NEIGHBOURS.get(concept.lower(), []))

    def attack_prompts(self, concept: str, n: int) -> list[str]:
        return [p.prompt for p in world.probes_for(concept, world.TRAIN_SPLIT, n=n, seed=5)]

    def text_attacks(self, concept: str, n: int = 4) -> dict[str, list[str]]:
        """Attack prompts per text attack for a toy concept."""
        kind = world.kind_of(concept)
        base = [p.prompt for p in world.probes_for(concept, world.TRAIN_SPLIT, n=n, seed=3)]
        aliases = world.aliases(concept)
        if kind == "style":  # the canonical phrase "in stripes style" becomes the alias ("striped")
            described = [p.replace(world.STYLE_PHRASE.format(concept), aliases[i % len(aliases)])
                         for i, p in enumerate(base)]
            para = [f"an image showing {article_free(p)}" for p in base]
        else:
            described = [replace_word(p, concept, aliases[i % len(aliases)]) for i, p in enumerate(base)]
            name = concept.capitalize() if kind == "identity" else concept
            para = ([t.format(identity=name) for t in world.PARAPHRASE_CHARACTER_TEMPLATES] if kind == "identity" else
                    [f"an image showing {article_free(p)}" for p in base])
        return {"misspelling": [replace_word(p, concept, misspell(concept)) for p in base],
                "paraphrase": (para * n)[:n],
                "described": described,
                "padding": [PADDING.format(p) for p in base]}

    def concept_images(self, concept: str, n: int, seed: int = 0) -> np.ndarray:
        """Real toy images of a concept (the inversion and partial-denoising sources)."""
        rng = random.Random(f"attack/{concept}/{seed}")
        kind, out = world.kind_of(concept), []
        for _ in range(n):
            s = world.random_scene(rng, identity_share=1.0 if kind == "identity" else 0.0)
            s = world.Scene(**{**s.__dict__, kind: concept}) if kind != "identity" else world.Scene(
                identity=concept, size=s.size, dx=s.dx, dy=s.dy)
            out.append(world.render(s, rng.randrange(1 << 30)))
        return np.stack(out)

    def real_features(self, judge, n: int = 256, seed: int = 4321) -> np.ndarray:
        """Judge features of real toy images from the generator (same scene distribution as 'general')."""
        rng = random.Random(seed)
        images = np.stack([world.render(world.random_scene(rng), rng.randrange(1 << 30)) for _ in range(n)])
        return judge.features(images)


def _kept_rows(set_name: str, concept: str, n: int, clean, avoid: set[str] | None) -> list:
    """n rows asking for `concept` (a concept the erasure must keep), plus, when `avoid` is given, one fresh
    prompt outside it for each of those rows that is inside it. Fresh prompts come from the canonical split
    with other seeds, then from the base model's own caption mix (aliases and paraphrase templates): an
    identity has only three canonical prompts, and every one of them is a preserve prompt."""
    from ..eval.rows import Row

    probes = [p for p in world.probes_for(concept, world.TRAIN_SPLIT, n=n, seed=7) if clean(p.prompt)]
    rows = [Row(set_name, p.prompt, concept, p.expect) for p in probes]
    missing = sum(p.prompt in avoid for p in probes) if avoid else 0
    seen = {p.prompt for p in probes}
    for split, seed in [(world.TRAIN_SPLIT, s) for s in range(8, 40)] + [("any", s) for s in range(40)]:
        if missing == 0:
            break
        for p in world.probes_for(concept, split, n=4, seed=seed):
            if missing and p.prompt not in avoid and p.prompt not in seen and clean(p.prompt):
                seen.add(p.prompt)
                rows.append(Row(set_name, p.prompt, concept, p.expect))
                missing -= 1
    return rows


def _replace(prompt: str, kind: str, name: str, alt: str | None) -> str:
    """A toy prompt with the concept replaced by `alt` (or removed)."""
    if kind == "style":
        new = world.STYLE_PHRASE.format(alt) if alt in world.STYLES else (alt or "")
        out = prompt.replace(world.STYLE_PHRASE.format(name), new)
    elif kind == "identity":
        out = re.sub(rf"\b{name}\b", (alt.capitalize() if alt in world.IDENTITIES else alt) or "a character",
                     prompt, flags=re.IGNORECASE)
    elif kind == "object":
        out = re.sub(rf"\b{name}\b", alt or "shape", prompt)
    else:  # color
        out = re.sub(rf"\b{name}\b ?", (alt + " ") if alt else "", prompt)
    return " ".join(out.split())
