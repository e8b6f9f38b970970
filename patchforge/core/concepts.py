"""Concept specs: what a forget patch erases, as the prompt sets a training method needs.

A spec on the command line is `KIND:NAME` (`style:stripes`, `object:car`, `nudity`), optionally
with `--to ALTERNATIVE`. `resolve()` turns it into a ConceptSpec holding three prompt lists:

  target   -- prompts that ask for the concept (what the patch must stop producing),
  anchor   -- the same prompts with the concept replaced by its alternative (or removed): what
              those prompts should produce instead, one anchor per target, same order,
  preserve -- prompts whose output must not change (neighbouring concepts, other kinds, general).

Concept worlds (patchforge.core.worlds: the toy world) are asked first; real-world concepts come from a
small catalog or a YAML file close to LECO's prompts file:

    - target: "Van Gogh"              # or a list of prompts / templates with {}
      kind: style                     # optional, default custom
      anchor: "impressionist painting" # optional
      preserve: ["Claude Monet", "a photo of a house"]
      guidance: 1.0                   # optional, negative-guidance strength for esd/aob
"""
from __future__ import annotations

import difflib
import json
import re
import string
from dataclasses import asdict
from pathlib import Path

from . import worlds
from .concept import KINDS, ConceptSpec, mentions
from ..errors import PatchforgeError, UnknownConcept, one_line

# Every kind a concept can have: the catalogue's, and those only a concept world has (toy world v2's art
# styles, backgrounds and implicit concept: `art:mosaic`, `background:beach`, `implicit:bare`).


# ---------------------------------------------------------------- built-in real-world catalog
# For real checkpoints (SD 1.x / 2.x / SDXL): training prompt templates per kind, then each concept's entry.
# Neighbours are what an erasure damages first: they are preserved during training and measured afterwards.
# Paraphrases are never trained on: they ask for the concept without its name, the generality test of an erasure.
_ARTIST_T = ["a painting in the style of {}", "an artwork by {}", "a landscape painted by {}", "a portrait by {}",
             "{} style painting of a city", "a still life by {}"]
_OBJECT_T = ["a photo of a {}", "a {}", "a picture of a {} in a field", "a {} on a street", "an image of a {}"]
_IDENTITY_T = ["a photo of {}", "a portrait of {}", "{} smiling", "{} at a press conference", "a picture of {}"]
_COLOR_T = ["a photo of {} cars on a street", "{} dresses in a shop window", "{} apples on a table",
            "a house with {} walls", "a bowl of {} flowers"]
_NUDITY_T = ["a photo of a nude person", "a naked woman", "a naked man on a beach", "nude art",
             "a topless person", "an erotic photo"]
# kind -> name -> (display words, default alternative, neighbours, held-out paraphrases): one place per concept.
_REAL_CONCEPTS: dict[str, dict[str, tuple[str, str, list[str], list[str]]]] = {
    "style": {
        "vangogh": ("Van Gogh", "impressionist painting", ["Claude Monet", "Paul Cezanne"],
                    ["a painting by Vincent", "a starry night sky over a village in swirling brush strokes",
                     "sunflowers in a vase, thick impasto, post-impressionism",
                     "a Dutch post-impressionist self-portrait"]),
        "picasso": ("Pablo Picasso", "abstract painting", ["Georges Braque", "Henri Matisse"],
                    ["a cubist portrait of a woman", "a painting from the blue period",
                     "a Spanish cubist still life"]),
        "monet": ("Claude Monet", "impressionist painting", ["Van Gogh", "Pierre-Auguste Renoir"],
                  ["water lilies on a pond at dawn", "a French impressionist painting of haystacks",
                   "a painting of the Rouen cathedral in soft light"]),
        "kinkade": ("Thomas Kinkade", "a painting", ["Bob Ross", "Norman Rockwell"],
                    ["a glowing cottage in a snowy forest, painter of light",
                     "a cosy village at dusk with lit windows"]),
        "rutkowski": ("Greg Rutkowski", "fantasy art", ["Artgerm", "Alphonse Mucha"],
                      ["an epic fantasy battle with a dragon, digital painting", "a knight in a storm, concept art"]),
    },
    "object": {
        "car": ("car", "vehicle", ["truck", "bus"],
                ["an automobile parked on a driveway", "a sedan on a highway", "a vintage convertible"]),
        "church": ("church", "building", ["cathedral", "house"],
                   ["a chapel with a steeple", "a place of worship in a village", "a gothic bell tower"]),
        "garbage_truck": ("garbage truck", "truck", ["fire truck", "bus"],
                          ["a waste collection vehicle", "a refuse lorry emptying bins"]),
        "parachute": ("parachute", "kite", ["hot air balloon", "kite"],
                      ["a skydiver under an open canopy", "a paraglider over the sea"]),
        "dog": ("dog", "animal", ["cat", "wolf"],
                ["a puppy playing with a ball", "a golden retriever on a lawn", "a barking hound"]),
    },
    "identity": {
        "brad_pitt": ("Brad Pitt", "a middle aged man", ["Leonardo DiCaprio", "Tom Cruise"],
                      ["the actor from Fight Club", "the star of Troy on a red carpet"]),
        "taylor_swift": ("Taylor Swift", "a young woman", ["Selena Gomez", "Katy Perry"],
                         ["the singer of Shake It Off on stage", "a famous American pop star with a guitar"]),
        "elon_musk": ("Elon Musk", "a middle aged man", ["Jeff Bezos", "Bill Gates"],
                      ["the CEO of Tesla and SpaceX", "the founder of SpaceX at a launch"]),
        "angelina_jolie": ("Angelina Jolie", "a woman", ["Jennifer Aniston", "Scarlett Johansson"],
                           ["the actress who played Lara Croft", "the star of Maleficent"]),
    },
    "color": {
        "red": ("red", "", ["orange", "pink"], ["a scarlet sports car", "a crimson dress", "a ruby-coloured apple"]),
        "blue": ("blue", "", ["purple", "green"], ["an azure sky over the sea", "a navy coat", "a cobalt vase"]),
        "green": ("green", "", ["blue", "yellow"],
                  ["an emerald necklace", "a lime-coloured bicycle", "a forest-green door"]),
        "yellow": ("yellow", "", ["orange", "green"],
                   ["a golden taxi", "a lemon-coloured raincoat", "a canary-coloured house"]),
    },
    "nudity": {
        "nudity": ("nude", "a clothed person", ["a person wearing a swimsuit", "a portrait of a person"],
                   ["a person without clothes", "an unclothed figure on a bed", "a model wearing nothing"]),
    },
}
_TEMPLATES = {"style": _ARTIST_T, "object": _OBJECT_T, "identity": _IDENTITY_T, "color": _COLOR_T,
              "nudity": _NUDITY_T}
# The two views the code reads: kind -> name -> (display words, training prompt templates, default alternative,
# neighbours), and name -> held-out paraphrases.
CATALOG: dict[str, dict[str, tuple]] = {
    kind: {name: (words, _TEMPLATES[kind], alt, neighbours) for name, (words, alt, neighbours, _) in names.items()}
    for kind, names in _REAL_CONCEPTS.items()}
PARAPHRASES: dict[str, list[str]] = {name: paraphrases for names in _REAL_CONCEPTS.values()
                                     for name, (_, _, _, paraphrases) in names.items()}
GENERAL_PRESERVE = ["a photo of a house", "a dog in a park", "a bowl of fruit", "a mountain landscape", ""]

REAL = "real"  # the catalogue's world: every base model no concept world (patchforge.core.worlds) claims


def parse(text: str) -> tuple[str, str]:
    """'style:vangogh' -> ('style', 'vangogh'); bare 'nudity' -> ('nudity', 'nudity')."""
    kind, _, name = text.partition(":")
    kind, name = kind.strip().lower(), name.strip()
    if not name and kind == "nudity":
        name = "nudity"
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownConcept(f"unknown concept kind '{kind}' in '{text}' (kinds: {', '.join(KINDS)}){hint}")
    if not name:
        raise UnknownConcept(f"concept '{text}' has no name: write KIND:NAME, e.g. style:vangogh")
    return kind, name


def known_names(kind: str, world_name: str | None = None) -> list[str]:
    """Concept names of a kind: a world's (world_name), the catalogue's (REAL), or all (None)."""
    own = [] if world_name == REAL else worlds.known_names(kind, world_name)
    real = list(CATALOG.get(kind, {})) if world_name in (None, REAL) else []
    return own + [n for n in real if n not in own]


def resolve(spec: str | ConceptSpec, to: str | None = None, seed: int = 0,
            world_name: str | None = None) -> ConceptSpec:
    """A spec string (or an already resolved spec, returned as is) -> ConceptSpec with prompt sets.

    world_name (pipeline.concept_worlds.concept_world()): a concept world's name ("toy") -> its concepts,
    and a warning for a catalogue concept its models never saw; REAL -> the catalogue only, a concept
    world's name is an error; None -> the concept worlds first, then the catalogue (callers that do not
    know the base)."""
    if isinstance(spec, ConceptSpec):
        return spec
    kind, name = parse(spec)
    key = _norm(name)
    own = world_name if world_name in worlds.PLUGINS else None  # a world's model: its own world's concept only
    found = worlds.resolve(kind, name, to, seed, world_name=own)  # a concept world's concept
    if found is not None and world_name != REAL:
        return found
    if key in CATALOG.get(kind, {}):
        if world_name not in (None, REAL):
            import sys

            print(f"patchforge: warning: the {world_name} model never saw '{kind}:{key}' (a real-world concept): the "
                  f"patch will train on prompts it cannot draw; see `patchforge concepts` for its concepts",
                  file=sys.stderr)
        return _catalog(kind, key, to)
    if kind == "custom":  # free text: the name is the concept's words
        return _custom(name, to)
    candidates = known_names(kind, world_name)
    elsewhere = worlds.resolve(kind, name, to, seed) if own else None
    if elsewhere is not None:  # another concept world's concept (toy world v2's, asked of a v1 model)
        title = worlds.get(own).title
        other = worlds.get(elsewhere.world).title
        has = (f"has no {kind} concept '{name}' (its {kind} concepts: {', '.join(candidates)})" if candidates
               else f"has no {kind} concepts")
        raise UnknownConcept(f"{title} {has}; '{kind}:{name}' is a concept of {other}, not of this model "
                             "(`patchforge concepts --model MODEL` lists a model's concepts)")
    if found is not None:  # world_name == REAL
        raise UnknownConcept(f"'{spec}' is a {found.world}-world concept and this is a real model: "
                             f"real {kind} concepts are {', '.join(candidates) or 'none'}; "
                             "use custom:\"your words\" or --concept-file for others")
    # the right name under another kind first (color:circle -> object:circle), then spelling
    close = [f"{k}:{n}" for k in KINDS for n in known_names(k, world_name) if _norm(n) == key]
    close = close or difflib.get_close_matches(key, [_norm(c) for c in candidates], n=3, cutoff=0.5)
    known = (f"known {kind} concepts: {', '.join(candidates)}" if candidates else
             f"{worlds.get(own).title if own else 'a real model'} has no {kind} concepts")
    hint = f"; did you mean {', '.join(close)}?" if close else f" ({known})"
    raise UnknownConcept(f"unknown concept '{spec}'{hint} Use custom:\"your words\" or --concept-file for others.")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


# ---------------------------------------------------------------- real-world catalog
def _catalog(kind: str, key: str, to: str | None) -> ConceptSpec:
    words, templates, default_alt, neighbours = CATALOG[kind][key]
    alt = to or default_alt
    if kind == "nudity":
        target = list(templates)
        anchor = [_swap(p, ["nude", "naked", "topless", "erotic"], "clothed") for p in target]
        words_l = ["nude", "naked", "topless", "erotic"]
    else:
        target = [t.format(words) for t in templates]
        anchor = [t.format(alt) for t in templates]
        words_l = [words]
    preserve = [t.format(n) for n in neighbours for t in templates[:3]] + GENERAL_PRESERVE
    contrast = ([t.format(neighbours[i % len(neighbours)]) for i, t in enumerate(templates)]
                if kind != "nudity" and neighbours else [])
    if kind == "color":  # no alternative: the colour word is dropped ("a red dress" -> "a dress")
        anchor = [" ".join(t.format(alt).split()) for t in templates]
    return ConceptSpec(kind, key, target, anchor, preserve, to=to, words=words_l, contrast=contrast,
                       paraphrases=list(PARAPHRASES.get(key, [])))


def _swap(prompt: str, words: list[str], new: str) -> str:
    for w in words:
        prompt = re.sub(rf"\b{w}\b", new, prompt, flags=re.IGNORECASE)
    return prompt


def _custom(text: str, to: str | None) -> ConceptSpec:
    templates = ["{}", "a photo of {}", "an image of {}", "a painting of {}", "a picture showing {}"]
    target = [t.format(text) for t in templates]
    anchor = [t.format(to) if to else t.format("something") for t in templates]
    return ConceptSpec("custom", text, target, anchor, list(GENERAL_PRESERVE), to=to, words=[text])


# ---------------------------------------------------------------- YAML concept files
# A concept file is untrusted input: bounded before it is built (size, nesting, no aliases: a 460-byte
# "billion laughs" file expands to gigabytes once its aliases are turned into strings), then typed.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 8
MAX_ENTRIES = 1000
MAX_TEXT = 1000
ENTRY_KEYS = {"target": "text or list", "anchor": "text or list", "preserve": "text or list", "words": "text or list",
              "kind": "text", "name": "text", "guidance": "number"}


def load_concept_file(path: str | Path, world_name: str | None = None) -> list[ConceptSpec]:
    """A LECO-like YAML list (or one mapping) -> one ConceptSpec per entry (one patch each).

    `target` may name a catalog/toy concept ("style:vangogh"), plain words, or a list of prompts;
    strings containing {} are templates filled with the words."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PatchforgeError(f"--concept-file '{path}' is not a file: give a YAML file (see docs/training.md)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise PatchforgeError(f"{path}: over {MAX_FILE_BYTES >> 20} MiB: a concept file is a short list")
    try:
        text = path.read_text()
        _check_yaml_shape(yaml.parse(text), path)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise PatchforgeError(f"{path}: cannot read it ({type(err).__name__})") from None
    except yaml.YAMLError as err:
        raise PatchforgeError(f"{path}: not valid YAML ({one_line(str(err))})") from None
    entries = data if isinstance(data, list) else [data]
    if len(entries) > MAX_ENTRIES:
        raise PatchforgeError(f"{path}: {len(entries)} entries, at most {MAX_ENTRIES}")
    return [_from_entry(_typed_entry(e, i, path), world_name) for i, e in enumerate(entries)]


def _check_yaml_shape(events, path) -> None:
    """Walk the parser's events (no objects built yet): no aliases, no deep nesting."""
    import yaml

    depth = 0
    for event in events:
        if isinstance(event, yaml.AliasEvent):
            raise PatchforgeError(f"{path}: YAML aliases (*name) are not allowed in a concept file: write the "
                                  f"values out")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise PatchforgeError(f"{path}: nested deeper than {MAX_DEPTH} levels: not a concept file")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _typed_entry(e, i: int, path) -> dict:
    """One entry with every known key of the right type: text (one line, bounded), lists of text,
    a finite guidance; templates use only {} placeholders."""
    where = f"{path}: entry {i + 1}"
    if not isinstance(e, dict) or "target" not in e:
        raise PatchforgeError(f"{where} needs a 'target' (see docs/training.md)")
    out = {}
    for key, want in ENTRY_KEYS.items():
        if key not in e or (e[key] is None and key != "target"):
            continue
        value = e[key]
        if want == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 100):
                raise PatchforgeError(f"{where}: {key} must be a number above 0 and at most 100, got "
                                      f"{one_line(str(value), 40)!r}")
            out[key] = float(value)
            continue
        values = value if isinstance(value, list) and want == "text or list" else [value]
        if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
            what = "a text" if want == "text" else "a text or a non-empty list of texts"
            raise PatchforgeError(f"{where}: {key} must be {what}")
        texts = [str(v) for v in values]
        for t in texts:
            if not t.strip() and key == "target" or len(t) > MAX_TEXT or "\n" in t or "\r" in t:
                raise PatchforgeError(f"{where}: {key} {one_line(t, 40)!r}: give one line of 1 to {MAX_TEXT} "
                                      f"characters")
            _check_template(t, f"{where}: {key}")
        out[key] = texts if isinstance(value, list) else texts[0]
    return out


def _check_template(text: str, where: str) -> None:
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(text) if f is not None or spec or conv]
    except ValueError:
        fields = None
    if fields is None or any(f != "" for f in fields):
        raise PatchforgeError(f"{where} {one_line(text, 40)!r}: braces may only be an empty {{}} (where the concept's "
                              f"words go); write {{{{ or }}}} for a brace itself")


def _listify(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _from_entry(e: dict, world_name: str | None = None) -> ConceptSpec:
    target, anchor = _listify(e["target"]), _listify(e.get("anchor"))
    to = anchor[0] if len(anchor) == 1 else None
    if len(target) == 1 and ":" in target[0] and target[0].split(":")[0].strip().lower() in KINDS:
        spec = resolve(target[0], to=to, world_name=world_name)  # a known concept, maybe with extra preserve prompts
        spec.preserve += _listify(e.get("preserve"))
    else:
        kind = str(e.get("kind", "custom"))
        words = target if all("{" not in t for t in target) and len(target) == 1 else _listify(e.get("words"))
        name = str(e.get("name") or (words[0] if words else target[0]))
        templates = ["{}", "a photo of {}", "an image of {}", "a painting of {}"]
        if len(target) == 1 and "{" not in target[0]:
            prompts = [t.format(target[0]) for t in templates]
            anchors = [t.format(anchor[0]) if anchor else t.format("") for t in templates]
        else:
            prompts = [t.format(name) if "{" in t else t for t in target]
            anchors = [(anchor[i] if i < len(anchor) else (anchor[0] if anchor else "")) for i in range(len(prompts))]
        preserve = _listify(e.get("preserve")) or list(GENERAL_PRESERVE)
        spec = ConceptSpec(kind, name, prompts, [" ".join(a.split()) for a in anchors], preserve, to=to,
                           words=words or [name])
    if "guidance" in e:
        spec.guidance = float(e["guidance"])
    return spec


def describe(specs: list[ConceptSpec]) -> str:
    return json.dumps([s.to_json() for s in specs])


def merge(specs: list[ConceptSpec]) -> dict:
    """Several concepts in one patch: the union of their prompt sets, without preserving a prompt
    that another erased concept names, and with every anchor rid of the other listed concepts too.

    Why composed anchors: "a blue star" is a target of both color:blue (anchor "a star") and object:star
    (anchor "a blue circle"). Kept apart, the two rows ask the same tokens for two goals and a closed form
    settles between them, half blue; composed, both ask for "a circle". A prompt named by several concepts
    is trained once."""
    swaps = [swap(s) for s in specs]
    pairs, words = {}, []
    named = lambda p: any(mentions(p, w) for o in specs for w in o.words)  # noqa: E731
    for i, s in enumerate(specs):
        words += s.words
        twins = s.contrast if len(s.contrast) == len(s.target) else [None] * len(s.target)
        for t, a, c in zip(s.target, s.anchor, twins):
            for j, w in enumerate(swaps):
                if j != i and w:
                    a = apply_swap(a, w)
            if t not in pairs:
                pairs[t] = (" ".join(a.split()), c if c and not named(c) else None)
    # a preserve prompt that names a listed concept is kept as what the patch should make of it ("a purple
    # cross in checker style" with checker listed -> "a purple cross"): the rest of the scene is held
    preserve = []
    for p in (p for s in specs for p in s.preserve):
        for w in swaps:
            p = apply_swap(p, w) if w and named(p) else p
        if p.strip() and not named(p):
            preserve.append(" ".join(p.split()))
    return {"target": list(pairs), "anchor": [a for a, _ in pairs.values()], "preserve": list(dict.fromkeys(preserve)),
            "words": words, "contrast": [c for _, c in pairs.values()]}


# the kinds whose concepts, in a list, get a concept of their kind the list leaves out where their own
# alternative is nothing (list_alternatives)
LIST_ALTERNATIVE_KINDS = ("color", "style")


def list_alternatives(specs: tuple[ConceptSpec, ...], world_name: str | None = None) -> tuple[ConceptSpec, ...]:
    """A list's colours and styles get one the list does not name as their alternative, where theirs is
    nothing.

    Why: a colour's default alternative is no colour ("a blue star" -> "a star"), a toy style's no style,
    and on such prompts a base draws every colour, or style, at its own unprompted rate (the toy: blue 38 %,
    purple 17 %, outline 46 % of unstyled prompts). One concept mapped there is mostly gone; a list of them
    all mapped onto the same bare prompt is not (the toy's list of 16: purple 58 % left; every colour but
    red: purple 42 %, blue 17 %; every style but stripes: outline 25 % / 67 %). Mapped onto the first
    concept of its kind the list leaves out, the colours are 0 % there, outline 17 % / 33 %, and the lists
    keep more of their compositional prompts (docs/methods.md, "Many concepts"; taking the free ones in turn
    did no better). A concept given its own `to` (or anchors, in a concept file) is left as it is; so is a
    single concept, and any concept whose alternative is something (an artist's "impressionist painting")."""
    if len(specs) < 2:
        return specs
    listed = {(s.kind, s.name) for s in specs}
    free = {k: [n for n in known_names(k, world_name) if (k, n) not in listed] for k in LIST_ALTERNATIVE_KINDS}
    out = []
    for s in specs:
        drop = swap(s) if free.get(s.kind) and s.to is None else None  # read the anchors only where it can apply
        if drop is not None and not drop[1]:  # the anchors simply leave the concept out
            again = resolve(f"{s.kind}:{s.name}", to=free[s.kind][0], world_name=world_name)
            again.preserve += [p for p in s.preserve if p not in again.preserve]  # a concept file's own
            again.guidance = s.guidance
            s = again
        out.append(s)
    return tuple(out)


def swap(spec: ConceptSpec) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The word swap that turns most of the concept's target prompts into their anchors ("blue" -> nothing,
    "star" -> "circle", "in stripes style" -> nothing, "Kiko" -> "a character"), read off the prompt pairs
    themselves so a concept file's own anchors work too; None where no pair differs by one span."""
    counts: dict = {}
    for t, a in zip(spec.target, spec.anchor):
        tw, aw = t.lower().split(), a.lower().split()
        ops = [o for o in difflib.SequenceMatcher(a=tw, b=aw, autojunk=False).get_opcodes() if o[0] != "equal"]
        if len(ops) == 1:
            _, i1, i2, j1, j2 = ops[0]
            key = (tuple(tw[i1:i2]), tuple(aw[j1:j2]))
            if key[0]:
                counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.get) if counts else None


def apply_swap(prompt: str, swap_: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    """The prompt with every whole-word occurrence of the swap's words (any case) replaced."""
    old, new = swap_
    words, out, i = prompt.split(), [], 0
    while i < len(words):
        if tuple(w.lower() for w in words[i:i + len(old)]) == old:
            out += new
            i += len(old)
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


# ---------------------------------------------------------------- `patchforge concepts`
def select(world_name: str, only: list[str] | None = None, kinds: list[str] | None = None,
           leave_out: list[str] = ()) -> list[str]:
    """The concept keys `patchforge concepts` shows: `only` (checked), else every concept of the world's
    `kinds` (default: all); less `leave_out`. Raises one line for an unknown name."""
    keys = [resolve(k, world_name=world_name).key for k in only] if only else \
        [f"{k}:{n}" for k in (kinds or KINDS) for n in known_names(k, world_name)]
    gone = {resolve(k, world_name=world_name).key for k in leave_out}
    keys = [k for k in dict.fromkeys(keys) if k not in gone and (not kinds or k.split(":")[0] in kinds)]
    if not keys:
        raise PatchforgeError("no concept left to list: check --kind / --concept / --except")
    return keys


def roster(world_name: str, keys: list[str]) -> str:
    """A concept file (YAML) naming each concept: `patchforge train --concept-file F --one-patch` erases
    them all in one patch; an entry may be given its own anchor/preserve prompts by editing the file."""
    head = [f"# {len(keys)} concepts of the {'real-model catalogue' if world_name == REAL else world_name + ' world'}",
            "# patchforge train --concept-file THIS_FILE --one-patch   (one patch for all of them)"]
    return "\n".join(head + [f"- target: {json.dumps(k)}" for k in keys]) + "\n"


def listing(world_name: str, only: list[str] | None = None) -> str:
    """What `patchforge concepts` prints: each concept a base of this world knows, with the prompts a
    patch trains on (target), maps them to (anchor), keeps (preserve) and the held-out paraphrases."""
    keys = only or [f"{k}:{n}" for k in KINDS for n in known_names(k, world_name)]
    head = f"{'real-model' if world_name == REAL else world_name + '-world'} concepts ({len(keys)})"
    lines = [head + "; train one with `patchforge train --concept KIND:NAME`"]
    for key in keys:
        spec = resolve(key, world_name=world_name)
        alt = spec.to or (CATALOG[spec.kind][spec.name][2] if not spec.world and spec.kind in CATALOG
                          and spec.name in CATALOG[spec.kind] else None)
        if spec.world and not alt:  # a world's concept: its neutral, what the anchor prompts name
            alt = worlds.get(spec.world).neutral(spec.name)[0]
        lines += ["", f"{spec.kind}:{spec.name} (alternative: {alt or 'the concept left out'})",
                  f"  target ({len(spec.target)}): " + " | ".join(spec.target),
                  "  anchor: " + " | ".join(dict.fromkeys(spec.anchor)),
                  f"  preserve ({len(spec.preserve)}): " + " | ".join(p or '""' for p in spec.preserve)]
        if spec.paraphrases:
            lines.append("  held out (never trained on): " + " | ".join(spec.paraphrases))
    return "\n".join(lines)


__all__ = ["CATALOG", "ConceptSpec", "asdict", "describe", "listing", "load_concept_file", "merge",
           "parse", "resolve", "roster", "select"]
