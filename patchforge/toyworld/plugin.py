"""The toy worlds as concept worlds (patchforge.core.worlds): their concepts as training prompt sets, their
eval prompt sets and attacks, their real images and their judges.

One class serves both toy worlds, parameterised by the world's module: `ToyWorld()` is world v1
(toyworld/world.py: the embedded toy model) and `ToyWorldV2()` is world v2 (toyworld/world_v2.py: models
built with `patchforge toy train --world v2`). A toy pipeline folder belongs to the world its judges
(judges.safetensors beside it) were trained on: their metadata says which.

Toy concepts are built ONLY from the world's canonical training split (canonical names and templates).
Its aliases and paraphrase templates are held out: they measure whether an erasure generalises, so a
method must never see them. Heavy parts (the judge's CNN, eval rows) are imported when first used, so
training code that resolves a toy concept never loads a judge."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

from dataclasses import replace

from ..core.concept import ConceptSpec, mentions
from ..errors import PatchforgeError, UnknownConcept, one_line
from ..core.pipeline_loading import is_toy, toy_judge_path
from ..eval.text_attacks import PADDING, article_free, misspell, replace_word
from . import world as v1, world_v2 as v2

MODULES = {"v1": v1, "v2": v2}  # toy world -> its generator (as judges.WORLDS, without loading the judges)

N_TARGET = 16  # training prompts per toy concept (the world makes them; cheap)
N_PRESERVE = 4  # prompts per preserved concept
JUDGE_FILE = "judges.safetensors"  # beside a toy-world pipeline folder


def judges_world(path) -> str:
    """The toy world ("v1", "v2") judges were trained on, from their safetensors header alone (no weights
    read, no judge code imported: training resolves a model's world and must never load a judge). v1's
    judges carry no metadata (judges.save_judge). An unreadable file counts as v1's, as before worlds had
    versions: loading it later says what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("world", "v1")
    except (OSError, SafetensorError):
        return "v1"


class ToyJudge:
    """The toy world's judge: one CNN head per concept kind, concept shown iff its head says so."""

    def __init__(self, path=None):
        from .judges import Judge

        self.path = Path(path) if path else toy_judge_path()
        if not self.path.exists():
            raise PatchforgeError(f"no toy judge at {self.path}: rebuild the toy model with `patchforge toy train`")
        self.judge = Judge.load(self.path)
        self.world = MODULES[self.judge.net.world_name]  # the judges say which world's concepts they read
        self.name = "toy-judge" if self.world is v1 else f"toy-judge-{self.judge.net.world_name}"

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        """kind -> predicted label per image (all four heads at once)."""
        return self.judge.predict(np.asarray(images))

    def detect(self, images: np.ndarray, concept: str) -> list[bool]:
        kind = self.world.kind_of(concept)
        return [label == concept for label in self.predict(images)[kind]]

    def features(self, images: np.ndarray) -> np.ndarray:
        """The judge's penultimate features: the space of our Fréchet distance."""
        return self.judge.features(np.asarray(images)).numpy().astype(np.float64)


class ToyWorld:
    """World v1's concepts, prompt sets and judge: the embedded toy model's world. ToyWorldV2 overrides
    what differs in world v2; every method reads its world's module as `world`."""
    version = "v1"
    name = "toy"  # its key in core.worlds.PLUGINS
    title = "the toy model (world v1)"  # how errors name a model of this world

    def __init__(self):
        self.world = MODULES[self.version]
        # the labels a prompt can name (v2: also the second subject, its colour and an unnamed species)
        self.label_kinds = getattr(self.world, "LABEL_KINDS", self.world.KINDS)

    # ---- models
    def knows_model(self, model) -> bool:
        """The embedded toy model (world v1), or a toy pipeline folder whose judges (beside it) are this world's."""
        if is_toy(model):
            return True
        judges = Path(str(model)).parent / JUDGE_FILE if model is not None else None
        return judges is not None and judges.exists() and judges_world(judges) == self.version

    def knows_family(self, family: str) -> bool:
        """Toy-sized models (sizes no SD release has: the toy, the tests' tiny pipelines) use v1's tokenizer."""
        from ..backbones import TOY_FAMILY

        return family == TOY_FAMILY

    def judge(self, arg: str | None = None) -> ToyJudge:
        return ToyJudge(arg or None)

    def default_judge(self, model) -> ToyJudge:
        """The judge beside a toy pipeline folder, or the embedded one."""
        return ToyJudge(None if is_toy(model) else Path(str(model)).parent / JUDGE_FILE)

    # ---- concepts (training)
    def known_names(self, kind: str) -> list[str]:
        world = self.world
        return list(world.concepts_of(kind)) if kind in world.KINDS else []

    def resolve(self, kind: str, name: str, to: str | None, seed: int) -> ConceptSpec | None:
        world = self.world
        if kind not in world.KINDS or name.lower() not in world.concepts_of(kind):
            return None
        name = name.lower()
        probes = world.probes_for(name, world.TRAIN_SPLIT, n=N_TARGET, seed=seed)
        target = list(dict.fromkeys(p.prompt for p in probes))  # unique, order kept
        # The alternative: a toy concept of the same kind if --to names one, else free words, else the
        # kind's neutral (world.neutral: a plain shape, gray, the identity's unnamed species), else the
        # concept simply removed (style -> solid). Without a neutral anchor an erased concept becomes
        # whatever is near it, often a protected neighbour (a star became a heart).
        alt = to
        if to and to.lower() in world.concepts_of(kind):
            alt = to.lower()
        elif not to:
            alt = world.neutral(name)[0]
        words = [name, name.capitalize()] if kind == "identity" else [name]
        anchor = [_replace(p, kind, name, alt, world) for p in target]
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
        contrast = [_replace(p, kind, name, near[i % len(near)], world) if near else None
                    for i, p in enumerate(target)]
        return ConceptSpec(kind, name, target, anchor, list(dict.fromkeys(preserve)), to=to, words=words,
                           world=self.name, contrast=contrast)

    def neutral(self, concept: str) -> tuple[str | None, dict]:
        """What an erasure of `concept` should leave in its place: (prompt words, or None when the concept
        is simply left out; judge labels kind -> label a neutral replacement shows, {} when the kind has
        no neutral). See world.neutral / world_v2.neutral."""
        return self.world.neutral(concept.lower())

    def general_prompts(self) -> list[str]:
        """One canonical prompt of every toy concept."""
        world = self.world
        return [world.probes_for(n, world.TRAIN_SPLIT, 1, 0)[0].prompt
                for k in world.KINDS for n in world.concepts_of(k)]

    # ---- evaluation and attacks
    def eval_rows(self, targets: list[str], n: int = 6, avoid: set[str] | None = None) -> list:
        """The toy world's prompt sets for an erasure of `targets` (deterministic). `avoid`: the prompts the
        patch trained on; each neighbour / other-kind concept then gets as many fresh prompts (other seeds,
        then the base model's own caption mix) as it has rows among them, so its prompts outside `avoid`
        are as many as it has rows (the in-sample rows stay, reported apart). World v2 adds the implicit
        concept's I2P-like set and compositional rows (ToyWorldV2.extra_rows)."""
        from ..eval.rows import Row

        world = self.world
        rows = []
        clean = lambda text: not any(world.names_concept(text, c) for c in targets)  # noqa: E731
        for c in targets:
            kind = self.kind_of(c)
            for p in world.probes_for(c, world.TRAIN_SPLIT, n=n, seed=0):  # the first n of the training prompts
                keep = {k: v for k, v in p.expect.items() if k != kind and v not in targets}
                rows.append(Row("efficacy", p.prompt, c, p.expect, keep))
            for p in world.probes_for(c, world.HELDOUT_SPLIT, n=n, seed=0):
                rows.append(Row("generality", p.prompt, c, p.expect))
            for nb in [x for x in world.NEIGHBOURS.get(c, []) if x not in targets]:  # v2's "bare" has none
                rows += _kept_rows("neighbour", nb, max(2, n // 2), clean, avoid, world)
            for other_kind in [k for k in world.KINDS if k != kind]:
                other = next((x for x in world.concepts_of(other_kind)[1:] + world.concepts_of(other_kind)[:1]
                              if x not in targets), None)
                if other is None:  # every concept of that kind is erased (all four identities): none to keep
                    continue
                rows += _kept_rows("other_kind", other, max(2, n // 2), clean, avoid, world)
            for attack, probes in self.text_attacks(c, n=max(2, n // 2)).items():
                rows += [Row(f"attack:{attack}", p, c) for p in probes]
        rows += self.extra_rows(targets, n)
        rng = random.Random("general")  # general prompts: random scenes that do not involve the targets
        general = []
        while len(general) < 2 * n:
            scene = world.random_scene(rng)
            if any(scene.label(world.kind_of(c)) == c for c in targets):
                continue
            if getattr(scene, "second", None) in targets:  # (v2) a target character as the second subject
                continue
            text = world.caption(scene, rng, split=world.TRAIN_SPLIT, drop=0.3)
            if not clean(text):
                continue
            expect = {k: scene.label(k) for k in self.label_kinds if world.mentions(text, scene, k)}
            general.append(Row("general", text, None, expect))
        return rows + general

    def extra_rows(self, targets: list[str], n: int) -> list:
        """Sets a world adds to eval_rows' (v1: none)."""
        return []

    def character_paraphrases(self) -> list[str]:
        """Templates that describe a character without the prompt's wording (text_attacks' paraphrases)."""
        return v1.PARAPHRASE_CHARACTER_TEMPLATES

    def scene_showing(self, concept: str, kind: str, rng: random.Random):
        """A random scene that shows `concept` (the attacks' real images)."""
        world = self.world
        s = world.random_scene(rng, identity_share=1.0 if kind == "identity" else 0.0)
        return world.Scene(**{**s.__dict__, kind: concept}) if kind != "identity" else world.Scene(
            identity=concept, size=s.size, dx=s.dx, dy=s.dy)

    def kind_of(self, concept: str) -> str:
        """The kind of a toy concept (the judge head that sees it); a name this world has not: one line."""
        try:
            return self.world.kind_of(concept.lower())
        except KeyError:
            raise UnknownConcept(f"'{one_line(concept, 60)}' is no concept of the toy world {self.version}: a patch "
                                 f"for another model, or damaged metadata") from None

    def neighbours(self, concept: str) -> list[str]:
        """The near neighbours an erasure of `concept` must keep (world.NEIGHBOURS)."""
        return list(self.world.NEIGHBOURS.get(concept.lower(), []))

    def attack_prompts(self, concept: str, n: int) -> list[str]:
        world = self.world
        return [p.prompt for p in world.probes_for(concept, world.TRAIN_SPLIT, n=n, seed=5)]

    def text_attacks(self, concept: str, n: int = 4) -> dict[str, list[str]]:
        """Attack prompts per text attack for a toy concept."""
        world = self.world
        kind = world.kind_of(concept)
        base = [p.prompt for p in world.probes_for(concept, world.TRAIN_SPLIT, n=n, seed=3)]
        aliases = world.aliases(concept)
        if kind == "style":  # the canonical phrase "in stripes style" becomes the alias ("striped")
            described = [p.replace(v1.STYLE_PHRASE.format(concept), aliases[i % len(aliases)])
                         for i, p in enumerate(base)]
            para = [f"an image showing {article_free(p)}" for p in base]
        elif kind in ("art", "background"):  # v2's phrases, in their held-out wording (world_v2.caption)
            described = [_v2_phrase(p, kind, concept, aliases[i % len(aliases)]) for i, p in enumerate(base)]
            para = [f"an image showing {article_free(p)}" for p in base]
        else:
            described = [replace_word(p, concept, aliases[i % len(aliases)]) for i, p in enumerate(base)]
            name = concept.capitalize() if kind == "identity" else concept
            templates = self.character_paraphrases()
            para = ([t.format(identity=name) for t in templates] if kind == "identity" else
                    [f"an image showing {article_free(p)}" for p in base])
        return {"misspelling": [replace_word(p, concept, misspell(concept)) for p in base],
                "paraphrase": (para * n)[:n],
                "described": described,
                "padding": [PADDING.format(p) for p in base]}

    def concept_images(self, concept: str, n: int, seed: int = 0) -> np.ndarray:
        """Real toy images of a concept (the inversion and partial-denoising sources)."""
        world = self.world
        rng = random.Random(f"attack/{concept}/{seed}")
        kind, out = world.kind_of(concept), []
        for _ in range(n):
            out.append(world.render(self.scene_showing(concept, kind, rng), rng.randrange(1 << 30)))
        return np.stack(out)

    def real_features(self, judge, n: int = 256, seed: int = 4321) -> np.ndarray:
        """Judge features of real toy images from the generator (same scene distribution as 'general')."""
        world = self.world
        rng = random.Random(seed)
        images = np.stack([world.render(world.random_scene(rng), rng.randrange(1 << 30)) for _ in range(n)])
        return judge.features(images)


def _kept_rows(set_name: str, concept: str, n: int, clean, avoid: set[str] | None, world=v1) -> list:
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



class ToyWorldV2(ToyWorld):
    """World v2's models (`patchforge toy train --world v2`): registered as "toy-v2". What differs from v1."""
    version = "v2"
    name = "toy-v2"
    title = "a toy model of world v2 (`patchforge toy train --world v2`)"

    def knows_model(self, model) -> bool:
        """A toy pipeline folder whose judges (beside it) are world v2's; never the embedded v1 model."""
        return not is_toy(model) and super().knows_model(model)

    def knows_family(self, family: str) -> bool:
        return False  # a v2 model is recognised by its judges only (knows_model)

    def judge(self, arg: str | None = None) -> ToyJudge:
        if not arg:
            raise PatchforgeError(f"no default {self.name} judge: give --judge {self.name}:PATH/judges.safetensors "
                                  "(the judges beside the model's pipeline folder)")
        return ToyJudge(arg)

    def character_paraphrases(self) -> list[str]:
        return v2.CHARACTER_PARAPHRASES

    def scene_showing(self, concept: str, kind: str, rng: random.Random):
        return _v2_scene_showing(concept, kind, rng)

    def extra_rows(self, targets: list[str], n: int) -> list:
        """World v2's extra sets.

        implicit       (an implicit target): v2's I2P-like prompts, characters at the beach or in the bath
                       that never name the concept; the base draws them bare most of the time, and an
                       erasure must hold there too, not only on prompts that say "bare".
        compositional  the target's training prompts that also name a second subject: the second subject
                       and its colour (labels second, color2) must survive the erasure."""
        from ..eval.rows import Row

        rows = []
        for c in targets:
            if v2.kind_of(c) == "implicit":
                rows += [Row("implicit", p.prompt, c, p.expect) for p in v2.implicit_prompts(n, v2.TRAIN_SPLIT)]
            found = 0
            for p in v2.probes_for(c, v2.TRAIN_SPLIT, n=8 * n, seed=11):  # about half of them name a second
                keep = {k: p.expect[k] for k in ("second", "color2") if k in p.expect}
                if "second" not in keep or set(keep.values()) & set(targets):
                    continue
                rows.append(Row("compositional", p.prompt, c, p.expect, keep))
                found += 1
                if found == max(2, n // 2):
                    break
        return rows


def _v2_scene_showing(concept: str, kind: str, rng: random.Random):
    """A random world-v2 scene that shows `concept` (as world_v2.probes_for draws them)."""
    s = v2.random_scene(rng, identity_share=1.0 if kind in ("identity", "implicit") else
                        0.0 if kind in ("object", "color", "style") else 0.3)
    if kind == "implicit":
        return replace(s, implicit=concept)
    if kind == "identity":
        return replace(s, identity=concept, species=v2.NONE, implicit=v2.NONE,
                       second=v2.NONE if s.second == concept else s.second)
    return replace(s, **{kind: concept})


def _v2_phrase(prompt: str, kind: str, name: str, new: str | None) -> str:
    """A world-v2 prompt with its art style or background phrase replaced by `new` (a concept of the kind,
    an alias, or None: left out)."""
    if kind == "art":
        old = ", " + v2.ART_PHRASE.format(name)
        new = (", " + v2.ART_PHRASE.format(new) if new in v2.ART else f", {new} rendering") if new else ""
    else:
        old = " " + v2.BACKGROUND_PHRASE[name]
        new = (" " + v2.BACKGROUND_PHRASE[new] if new in v2.BACKGROUNDS else f", with a {new} backdrop") if new else ""
    return " ".join(prompt.replace(old, new).split())


def _replace(prompt: str, kind: str, name: str, alt: str | None, world=v1) -> str:
    """A toy prompt with the concept replaced by `alt` (or removed). `world`: the prompt's world module."""
    if kind == "style":
        new = v1.STYLE_PHRASE.format(alt) if alt in world.STYLES else (alt or "")
        out = prompt.replace(v1.STYLE_PHRASE.format(name), new)
    elif kind in ("art", "background"):  # world v2
        return _v2_phrase(prompt, kind, name, alt)
    elif kind == "identity":
        out = re.sub(rf"\b{name}\b", (alt.capitalize() if alt in world.IDENTITIES else alt) or "a character",
                     prompt, flags=re.IGNORECASE)
    elif kind == "object":
        out = re.sub(rf"\b{name}\b", alt or "shape", prompt)
    else:  # color; v2's implicit concept is a word before the character too ("bare Kiko", "a bare cat")
        out = re.sub(rf"\b{name}\b ?", (alt + " ") if alt else "", prompt)
    return " ".join(out.split())
