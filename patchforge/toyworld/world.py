"""The toy world: a deterministic generator of captioned 32x32 RGB images.

Every concept kind patchforge must erase has a stand-in here:
  object   -- a shape (circle, square, ... with near neighbours star / pentagon),
  color    -- the shape's colour (with near neighbours red / orange / pink),
  style    -- how the shape is rendered (stripes / checker are near neighbours),
  identity -- a named character drawn as a fixed sprite (stand-in for celebrities).

A scene is either a styled coloured shape or one character. Labels are ground truth for the
judges. Captions come from templates; each concept also has *aliases* (synonyms, descriptions
without its name) and there are *paraphrase templates*. The base model is trained on all of them,
but patch methods only ever see canonical names in canonical templates (`TRAIN_SPLIT`), so
the held-out forms (`HELDOUT_SPLIT`) measure whether an erasure generalises.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
# how far the judges' training lets a character's colour drift per channel (in [-1, 1] units, peak to
# peak): the model draws Kiko anywhere from orange to yellow, and no v1 character is told apart by hue
CHARACTER_DRIFT = 0.8
BACKGROUND = (40, 40, 46)
PATTERN_LIGHT = (245, 245, 245)

# name -> held-out aliases (synonyms / descriptions without the name); COLORS adds each colour's RGB.
OBJECTS = {
    "circle": ["round disc", "disc"], "square": ["box", "four-sided block"],
    "triangle": ["wedge", "three-sided shape"], "star": ["spiky shape", "pointy asterisk"],
    "pentagon": ["five-sided shape", "home plate"], "heart": ["love symbol", "valentine"],
    "cross": ["plus sign", "plus shape"],
}
COLORS = {
    "red": ((220, 30, 30), ["crimson", "scarlet"]),
    "orange": ((245, 140, 20), ["tangerine", "amber"]),
    "pink": ((245, 120, 190), ["rose", "blush"]),
    "blue": ((40, 80, 230), ["azure", "cobalt"]),
    "green": ((40, 180, 60), ["emerald", "lime"]),
    "yellow": ((230, 235, 30), ["golden", "lemon"]),
    "purple": ((140, 50, 200), ["violet", "lavender"]),
}
# "solid" is the absence of a style: a label, not an erasable concept.
STYLES = {
    "stripes": ["striped", "lined"], "checker": ["checkered", "chessboard"], "dots": ["dotted", "polka-dot"],
    "rings": ["concentric", "bullseye"], "outline": ["outlined", "hollow"],
}
SOLID = "solid"
IDENTITIES = {
    "kiko": ["the cat character", "the whiskered cat"], "bruno": ["the robot character", "the metal robot"],
    "mira": ["the ghost character", "the floating ghost"], "tobi": ["the frog character", "the green frog"],
}
NONE = "none"

KINDS = ("object", "color", "style", "identity")
# Classes each judge head predicts (NONE for scenes where the kind does not apply).
LABELS = {
    "object": list(OBJECTS) + [NONE],
    "color": list(COLORS) + [NONE],
    "style": list(STYLES) + [SOLID, NONE],
    "identity": list(IDENTITIES) + [NONE],
}
# Near neighbours: the concepts an erasure of the key is most likely to damage.
NEIGHBOURS = {
    "star": ["pentagon", "cross"], "pentagon": ["star", "square"], "circle": ["heart", "square"],
    "square": ["pentagon", "cross"], "triangle": ["star", "heart"], "heart": ["circle", "triangle"],
    "cross": ["star", "square"],
    "red": ["orange", "pink"], "orange": ["red", "yellow"], "pink": ["red", "purple"],
    "blue": ["purple", "green"], "green": ["blue", "yellow"], "yellow": ["orange", "green"],
    "purple": ["pink", "blue"],
    "stripes": ["checker", "rings"], "checker": ["stripes", "dots"], "dots": ["checker", "rings"],
    "rings": ["stripes", "dots"], "outline": ["rings", "stripes"],
    "kiko": ["tobi", "mira"], "bruno": ["kiko", "tobi"], "mira": ["bruno", "kiko"], "tobi": ["kiko", "bruno"],
}

TRAIN_SPLIT, HELDOUT_SPLIT = "train", "heldout"


# What an erasure should leave where the concept was (`neutral`): the plain member of its kind.
PLAIN_OBJECTS = ("circle", "square", "triangle")


def neutral(name: str) -> tuple[str | None, dict]:
    """The neutral replacement of a concept: (words a prompt uses for it, or None when the concept is
    simply left out; the judge labels a neutral replacement shows). A style's neutral is solid; an
    object's a plain shape that is neither the concept nor one of its neighbours; an identity's, no
    character (v1 has no unnamed characters). v1 has no neutral colour: (None, {}) -- nothing to land on,
    any colour but the concept and its neighbours counts as "other"."""
    kind = kind_of(name)
    if kind == "style":
        return None, {"style": SOLID}
    if kind == "object":
        plain = next(o for o in PLAIN_OBJECTS if o != name and o not in NEIGHBOURS[name])
        return plain, {"object": plain}
    if kind == "identity":
        return None, {"identity": NONE}
    return None, {}


def concepts_of(kind: str) -> list[str]:
    return {"object": list(OBJECTS), "color": list(COLORS), "style": list(STYLES),
            "identity": list(IDENTITIES)}[kind]


def kind_of(name: str) -> str:
    for kind in KINDS:
        if name in concepts_of(kind):
            return kind
    raise KeyError(name)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. For a character scene object/color/style are NONE."""
    object: str = NONE
    color: str = NONE
    style: str = NONE
    identity: str = NONE
    size: int = 22
    dx: int = 0
    dy: int = 0

    def label(self, kind: str) -> str:
        return getattr(self, kind)


# ---------------------------------------------------------------- rendering
def grid(pixels: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (y, x) in the world's units (a 32-unit square), sampled `pixels` times per side:
    a larger image draws the same geometry with finer pixels (world v2 renders at 64)."""
    yy, xx = np.mgrid[0:pixels, 0:pixels].astype(np.float32) + 0.5
    scale = np.float32(IMAGE_SIZE / pixels)
    return (yy, xx) if pixels == IMAGE_SIZE else (yy * scale, xx * scale)


_yy, _xx = grid()


def polygon_mask(points, x, y):
    """Inside test for a convex or star polygon by the even-odd rule."""
    inside = np.zeros_like(x, dtype=bool)
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        cond = (y1 > y) != (y2 > y)
        xint = (x2 - x1) * (y - y1) / (y2 - y1 + 1e-9) + x1
        inside ^= cond & (x < xint)
    return inside


def _regular(n, r, cx, cy, rot=-np.pi / 2, inner=None):
    pts = []
    for i in range(n * (2 if inner else 1)):
        ang = rot + i * np.pi * 2 / (n * (2 if inner else 1))
        rad = r if (inner is None or i % 2 == 0) else inner
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    return pts


def shape_mask(obj: str, size: float, cx: float, cy: float, yx=None) -> np.ndarray:
    """yx: the sampling grid (`grid(pixels)`); default: v1's 32x32."""
    yy, xx = yx if yx is not None else (_yy, _xx)
    r = size / 2
    x, y = xx - cx, yy - cy
    if obj == "circle":
        return x * x + y * y <= r * r
    if obj == "square":
        h = r * 0.85
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if obj == "triangle":
        return polygon_mask(_regular(3, r * 1.1, 0, r * 0.15), x, y)
    if obj == "star":
        return polygon_mask(_regular(5, r * 1.05, 0, r * 0.08, inner=r * 0.42), x, y)
    if obj == "pentagon":
        return polygon_mask(_regular(5, r * 0.98, 0, r * 0.05), x, y)
    if obj == "heart":
        s = r * 0.95
        xs, ys = x / s, -(y / s) + 0.15
        return (xs * xs + ys * ys - 0.6) ** 3 - xs * xs * ys ** 3 * 1.1 <= 0
    if obj == "cross":
        w = r * 0.36
        return ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    raise KeyError(obj)


def style_light(style: str, mask: np.ndarray, cx: float, cy: float, yx=None) -> np.ndarray:
    """Where, inside the shape, the pattern shows the light colour instead of the shape colour."""
    yy, xx = yx if yx is not None else (_yy, _xx)
    if style == "stripes":
        return ((xx + yy) // 3) % 2 == 0
    if style == "checker":
        return ((xx // 4) + (yy // 4)) % 2 == 0
    if style == "dots":
        return ((xx % 5 - 2.5) ** 2 + (yy % 5 - 2.5) ** 2) <= 1.7
    if style == "rings":
        return (np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) // 2.5) % 2 == 1
    return np.zeros_like(mask)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def paint_shape(img: np.ndarray, obj: str, rgb, style: str, size: float, cx: float, cy: float, yx=None) -> None:
    """A coloured shape with its texture (v1's styles) onto img (in place)."""
    mask = shape_mask(obj, size, cx, cy, yx)
    rgb = np.array(rgb, np.float32)
    if style == "outline":  # the rim is 2 world units wide at any resolution
        mask = mask & ~erode(mask, 2 * img.shape[0] // IMAGE_SIZE)
        img[mask] = rgb
    else:
        img[mask] = rgb
        light = mask & style_light(style, mask, cx, cy, yx)
        img[light] = PATTERN_LIGHT


# species -> how its sprite is drawn; `main` is the body colour, the rest of its colours are fixed
def _cat(paint, x, y, main):  # round head, two triangular ears, green eyes, pink nose
    paint(polygon_mask([(-9, -2), (-8, -11), (-2, -7)], x, y) | polygon_mask([(9, -2), (8, -11), (2, -7)], x, y), main)
    paint((x / 9.5) ** 2 + ((y - 1) / 8.5) ** 2 <= 1, main)
    paint(((x + 3.5) ** 2 + (y + 0.5) ** 2 <= 3.2) | ((x - 3.5) ** 2 + (y + 0.5) ** 2 <= 3.2), (60, 200, 80))
    paint((x ** 2 + (y - 3.5) ** 2 <= 1.6), (250, 150, 190))


def _robot(paint, x, y, main):  # square head, antenna with red light, cyan visor, mouth grid
    paint((np.abs(x) <= 9) & (y >= -6) & (y <= 9), main)
    paint((np.abs(x) <= 0.8) & (y >= -11) & (y < -6), main)
    paint(x ** 2 + (y + 11) ** 2 <= 3.0, (230, 30, 30))
    paint((np.abs(x) <= 7) & (y >= -3) & (y <= 1), (40, 220, 230))
    paint((np.abs(x) <= 5) & (y >= 4) & (y <= 6) & ((x // 2) % 2 == 0), (50, 50, 50))


def _ghost(paint, x, y, main):  # dome with wavy hem, big black eyes
    head = ((x / 9) ** 2 + ((y + 1) / 9) ** 2 <= 1) & (y <= -1)
    body = head | ((np.abs(x) <= 9) & (y > -1) & (y <= 7 + 2 * np.sin(x * 1.2)))
    paint(body, main)
    paint(((x + 3.5) ** 2 + (y + 2) ** 2 <= 4) | ((x - 3.5) ** 2 + (y + 2) ** 2 <= 4), (20, 20, 30))


def _frog(paint, x, y, main):  # wide face, two bulging eyes on top, red smile
    paint((x / 10.5) ** 2 + ((y - 2) / 7) ** 2 <= 1, main)
    eyes = ((x + 5.5) ** 2 + (y + 5) ** 2 <= 12) | ((x - 5.5) ** 2 + (y + 5) ** 2 <= 12)
    paint(eyes, main)
    paint(((x + 5.5) ** 2 + (y + 5) ** 2 <= 5) | ((x - 5.5) ** 2 + (y + 5) ** 2 <= 5), (250, 250, 240))
    paint(((x + 5.5) ** 2 + (y + 5) ** 2 <= 1.5) | ((x - 5.5) ** 2 + (y + 5) ** 2 <= 1.5), (10, 10, 10))
    paint((np.abs(x) <= 6) & (np.abs(y - 4.5 - 0.05 * x * x) <= 0.8), (200, 40, 40))


SPECIES = {"cat": _cat, "robot": _robot, "ghost": _ghost, "frog": _frog}
# v1's characters: (species, body colour)
CHARACTERS = {"kiko": ("cat", (230, 130, 40)), "bruno": ("robot", (150, 155, 165)),
              "mira": ("ghost", (235, 235, 250)), "tobi": ("frog", (60, 170, 70))}


def draw_sprite(img: np.ndarray, draw, main, cx: float, cy: float, size: float, yx=None) -> None:
    """A character sprite (22 world units tall at size 22; `draw`: a SPECIES function) onto img, in place."""
    yy, xx = yx if yx is not None else (_yy, _xx)
    s = size / 22.0
    x, y = (xx - cx) / s, (yy - cy) / s

    def paint(mask, rgb):
        img[mask] = rgb

    draw(paint, x, y, main)


def _draw_character(img: np.ndarray, who: str, cx: float, cy: float, size: float) -> None:
    if who not in CHARACTERS:
        raise KeyError(who)
    species, main = CHARACTERS[who]
    draw_sprite(img, SPECIES[species], main, cx, cy, size)


def render(scene: Scene, noise_seed: int | None = None) -> np.ndarray:
    """Scene -> uint8 HxWx3 image. Deterministic given scene and noise_seed."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = BACKGROUND
    cx, cy = IMAGE_SIZE / 2 + scene.dx, IMAGE_SIZE / 2 + scene.dy
    if scene.identity != NONE:
        _draw_character(img, scene.identity, cx, cy, scene.size)
    else:
        paint_shape(img, scene.object, COLORS[scene.color][0], scene.style, scene.size, cx, cy)
    if noise_seed is not None:
        img += np.random.default_rng(noise_seed).normal(0, 4.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_scene(rng: random.Random, identity_share: float = 0.2) -> Scene:
    size, dx, dy = rng.randint(18, 26), rng.randint(-3, 3), rng.randint(-3, 3)
    if rng.random() < identity_share:
        return Scene(identity=rng.choice(list(IDENTITIES)), size=size, dx=dx, dy=dy)
    style = rng.choice(list(STYLES) + [SOLID, SOLID])
    return Scene(object=rng.choice(list(OBJECTS)), color=rng.choice(list(COLORS)), style=style,
                 size=size, dx=dx, dy=dy)


# ---------------------------------------------------------------- captions
# Canonical templates: the only ones a patch method may use.
STYLE_PHRASE = "in {} style"  # canonical way of naming a style
OBJECT_TEMPLATES = [
    "a {color} {object} {style}",
    "a photo of a {color} {object} {style}",
    "a {object} {style}",
    "a {color} {object}",
    "a photo of a {color} {object}",
    "a {object}",
    "a photo of a {object}",
]
CHARACTER_TEMPLATES = ["a picture of {identity}", "{identity}", "a photo of {identity}"]
# Held-out paraphrase templates: in the base model's training captions, never in a patch method's.
PARAPHRASE_OBJECT_TEMPLATES = [
    "{style}, {color} {object}",
    "an image showing a {object} that is {color}, {style}",
    "{color} colored {object} drawn {style}",
    "{style} {object}",
    "an image showing a {color} {object}",
    "{object} drawing",
]
PARAPHRASE_CHARACTER_TEMPLATES = ["an image of {identity}", "{identity} on a dark background"]


def style_phrase(style: str, alias: str | None = None) -> str:
    if style == SOLID:
        return ""
    return alias if alias is not None else STYLE_PHRASE.format(style)


def _alias(rng: random.Random, name: str, table: dict, p: float):
    aliases = table[name][1] if isinstance(table[name], tuple) else table[name]
    return rng.choice(aliases) if rng.random() < p else None


def caption(scene: Scene, rng: random.Random, split: str = "any", drop: float = 0.3, colors: dict = COLORS) -> str:
    """A caption for a scene. split='train': canonical names and templates only (what patch
    methods may see); 'heldout': aliases and paraphrase templates only; 'any': a mix (for the
    base model). Attributes are dropped at random with probability `drop` (not the object). `colors`: the
    colour table (world v2 adds one)."""
    p_alias = {"train": 0.0, "heldout": 1.0, "any": 0.3}[split]
    paraphrase = {"train": False, "heldout": True, "any": rng.random() < 0.25}[split]
    if scene.identity != NONE:
        name = _alias(rng, scene.identity, IDENTITIES, p_alias) or scene.identity.capitalize()
        tpl = rng.choice(PARAPHRASE_CHARACTER_TEMPLATES if paraphrase else CHARACTER_TEMPLATES)
        return tpl.format(identity=name)
    obj = _alias(rng, scene.object, OBJECTS, p_alias) or scene.object
    color = _alias(rng, scene.color, colors, p_alias) or scene.color
    style_alias = None if scene.style == SOLID else _alias(rng, scene.style, STYLES, p_alias)
    sty = style_phrase(scene.style, style_alias)
    if split == "heldout" and style_alias is None and scene.style != SOLID:
        sty = rng.choice(STYLES[scene.style])
    if rng.random() < drop:
        color = None
    if rng.random() < drop:
        sty = None
    tpls = PARAPHRASE_OBJECT_TEMPLATES if paraphrase else OBJECT_TEMPLATES
    # a template that names exactly the attributes kept (dropped ones teach partial prompts)
    usable = [t for t in tpls if ("{color}" in t) == bool(color) and ("{style}" in t) == bool(sty)]
    tpl = rng.choice(usable or [t for t in OBJECT_TEMPLATES
                                if ("{color}" in t) == bool(color) and ("{style}" in t) == bool(sty)])
    text = tpl.format(object=obj, color=color or "", style=sty or "")
    return " ".join(text.replace(" ,", ",").split()).strip(", ")


# ---------------------------------------------------------------- evaluation prompts
@dataclass(frozen=True)
class Probe:
    """A prompt and what a faithful generation must show (kind -> label)."""
    prompt: str
    expect: dict


def probes_for(name: str, split: str = TRAIN_SPLIT, n: int = 8, seed: int = 0) -> list[Probe]:
    """Prompts that ask for concept `name`, with the other attributes chosen at random.
    split=TRAIN_SPLIT: canonical names/templates; HELDOUT_SPLIT: aliases and paraphrases."""
    rng = random.Random(f"{name}/{split}/{seed}")
    kind = kind_of(name)
    out = []
    for i in range(n):
        if kind == "identity":
            scene = Scene(identity=name)
        else:
            scene = Scene(object=name if kind == "object" else rng.choice(list(OBJECTS)),
                          color=name if kind == "color" else rng.choice(list(COLORS)),
                          style=name if kind == "style" else rng.choice(list(STYLES) + [SOLID]))
        # keep the asked-for attribute in the prompt: no dropping of it
        while True:
            text = caption(scene, rng, split=split, drop=0.0 if kind != "object" else 0.3)
            if mentions(text, scene, kind):
                break
        expect = {k: scene.label(k) for k in KINDS if scene.label(k) != NONE and mentions(text, scene, k)}
        out.append(Probe(text, expect))
    return out


def aliases(name: str) -> list[str]:
    """A concept's held-out aliases (synonyms, descriptions without its name)."""
    entry = {"object": OBJECTS, "color": COLORS, "style": STYLES, "identity": IDENTITIES}[kind_of(name)][name]
    return list(entry[1] if isinstance(entry, tuple) else entry)


def names_concept(text: str, name: str) -> bool:
    """The text names the concept or one of its aliases."""
    t = text.lower()
    return any(w in t for w in [name, *aliases(name)])


def mentions(text: str, scene: Scene, kind: str) -> bool:
    """The caption names the scene's concept of this kind."""
    label = scene.label(kind)
    return label not in (NONE, SOLID) and names_concept(text, label)


def vocabulary() -> list[str]:
    """Every word the world's captions can use (for building the tokenizer)."""
    return list(_vocabulary())


@functools.cache  # a few seconds of captioning, the same every time
def _vocabulary() -> tuple[str, ...]:
    rng = random.Random(0)
    words = set()
    for _ in range(20000):
        sc = random_scene(rng, 0.3)
        for split in ("train", "heldout", "any"):
            words.update(caption(sc, rng, split).lower().replace(",", " , ").split())
    for table in (OBJECTS, STYLES, IDENTITIES):
        for k, v in table.items():
            words.add(k)
            for a in v:
                words.update(a.lower().split())
    for k, (_, v) in COLORS.items():
        words.add(k)
        for a in v:
            words.update(a.split())
    words.update(STYLE_PHRASE.format("x").split())
    words.discard("x")
    # words the attack / concept catalogue prompts commonly use
    words.update("a an the of in on with and photo picture painting image style drawing".split())
    return tuple(sorted(words))
