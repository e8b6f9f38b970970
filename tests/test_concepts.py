"""Concept specs: toy prompts come only from the canonical split; unknown names fail helpfully."""
import re

import pytest

from patchforge.core.concepts import apply_swap, list_alternatives, load_concept_file, merge, resolve, swap
from patchforge.errors import UnknownConcept
from patchforge.toyworld import world

HELDOUT_PHRASES = ([a for v in world.OBJECTS.values() for a in v] + [a for _, v in world.COLORS.values() for a in v]
                   + [a for v in world.STYLES.values() for a in v] + [a for v in world.IDENTITIES.values() for a in v]
                   + ["image showing", "drawing", "colored", "on a dark background", "an image of"])


@pytest.mark.parametrize("spec", [f"{k}:{n}" for k in world.KINDS for n in world.concepts_of(k)])
def test_toy_concepts_use_only_the_training_split(spec):
    c = resolve(spec)
    assert c.world == "toy" and len(c.target) >= 3 and len(c.anchor) == len(c.target) and len(c.preserve) >= 10
    assert all(re.search(rf"\b{c.name}\b", p, re.I) for p in c.target)
    assert not any(re.search(rf"\b{c.name}\b", p, re.I) for p in c.preserve + c.anchor)
    for text in c.target + c.anchor + c.preserve:
        for phrase in HELDOUT_PHRASES:
            assert not re.search(rf"\b{re.escape(phrase)}\b", text, re.I), (spec, phrase, text)


def test_alternative_and_neighbours():
    c = resolve("style:stripes", to="dots")
    assert all("in dots style" in a for a in c.anchor)
    assert any("checker" in p for p in c.preserve)  # a neighbour is preserved
    assert resolve("style:vangogh", to="impressionist painting").anchor[0].endswith("impressionist painting")
    assert resolve("nudity").kind == "nudity"


def test_contrast_prompts_name_a_neighbour_in_the_target_prompt():
    red = resolve("color:red")
    assert len(red.contrast) == len(red.target)
    for t, c in zip(red.target, red.contrast):
        assert re.sub(r"\b(orange|pink)\b", "red", c) == t and c != t  # only the concept word swapped
    gogh = resolve("style:vangogh")
    assert gogh.contrast[0] == "a painting in the style of Claude Monet" and not resolve("nudity").contrast
    # erasing red and orange together: no contrast row may ask to keep the other erased concept
    m = merge([red, resolve("color:orange")])
    assert len(m["contrast"]) == len(m["target"]) and any(m["contrast"])
    assert not any(re.search(r"\b(red|orange)\b", c) for c in m["contrast"] if c)


def test_unknown_concepts_suggest_close_matches():
    with pytest.raises(UnknownConcept, match="stripes"):
        resolve("style:strips")
    with pytest.raises(UnknownConcept, match="object:circle"):
        resolve("color:circle")
    with pytest.raises(UnknownConcept, match="style"):
        resolve("styel:vangogh")


def test_concept_file_and_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('- target: "Van Gogh"\n  kind: style\n  anchor: "impressionist painting"\n'
                 '  preserve: ["Claude Monet"]\n  guidance: 2.0\n- target: "object:star"\n')
    a, b = load_concept_file(f)
    assert a.name == "Van Gogh" and a.target[0] == "Van Gogh" and a.anchor[1] == "a photo of impressionist painting"
    assert a.guidance == 2.0 and a.preserve == ["Claude Monet"]
    assert b.world == "toy" and b.name == "star"
    m = merge([resolve("color:red"), resolve("object:star")])
    assert not any(re.search(r"\b(red|star)\b", p) for p in m["preserve"])


def test_merged_anchors_leave_out_every_listed_concept():
    blue, star, kiko = resolve("color:blue"), resolve("object:star"), resolve("identity:kiko")
    assert swap(blue) == (("blue",), ()) and swap(star) == (("star",), ("circle",))
    m = merge([blue, star, kiko])
    pairs = dict(zip(m["target"], m["anchor"]))
    assert len(pairs) == len(m["target"]) == len(m["contrast"])  # a prompt both concepts name, once
    assert pairs["a blue star"] == "a circle"  # neither blue (star's anchor was "a blue circle") nor star
    assert not any(re.search(r"\b(blue|star|kiko)\b", a, re.IGNORECASE) for a in m["anchor"])
    assert merge([star])["anchor"] == star.anchor  # one concept: its own anchors
    assert apply_swap("A Blue star in rings style", swap(blue)) == "A star in rings style"


def test_a_lists_colours_and_styles_are_anchored_on_one_the_list_leaves_out():
    """In a list, a colour (or toy style) whose alternative is nothing ("a blue star" -> "a star") is mapped
    onto the world's first one the list does not name; a colour given its own `to`, a single colour, the
    other kinds, an artist (whose alternative is a style) and a world whose colours have a neutral (v2: gray)
    keep their anchors."""
    free = next(c for c in world.concepts_of("color") if c not in ("red", "blue"))
    listed = list_alternatives((resolve("color:red"), resolve("color:blue", to="green"), resolve("object:star")),
                               "toy")
    red, blue, star = listed
    assert red.to == free and all(re.search(rf"\b{free}\b", a) and "red" not in a for a in red.anchor)
    assert blue.to == "green" and star.anchor == resolve("object:star").anchor
    assert red.preserve[:len(resolve("color:red", to=free).preserve)] == resolve("color:red", to=free).preserve
    alone = resolve("color:red")
    assert list_alternatives((alone,), "toy") == (alone,) and alone.to is None
    v2 = (resolve("color:red", world_name="toy-v2"), resolve("color:blue", world_name="toy-v2"))
    assert [s.anchor for s in list_alternatives(v2, "toy-v2")] == [s.anchor for s in v2]
    real = list_alternatives((resolve("color:red", world_name="real"), resolve("color:blue", world_name="real")),
                             "real")
    assert [s.to for s in real] == ["green", "green"]  # the catalogue's colours: red, blue, green, yellow
    styles = list_alternatives((resolve("style:outline"), resolve("style:dots")), "toy")
    assert [s.to for s in styles] == ["stripes", "stripes"] and all("stripes style" in a for a in styles[0].anchor)
    artists = (resolve("style:vangogh", world_name="real"), resolve("style:monet", world_name="real"))
    assert list_alternatives(artists, "real") == artists  # their alternative is a style already


def test_a_toy_concept_is_anchored_on_its_kinds_neutral_unless_to_is_given():
    from patchforge.toyworld import world_v2

    star = resolve("object:star")
    plain = world.neutral("star")[0]
    assert star.to is None and plain and plain not in world.NEIGHBOURS["star"]
    assert all(re.search(rf"\b{plain}\b", a) and "star" not in a for a in star.anchor)
    assert all("stripes" not in a and "style" not in a for a in resolve("style:stripes").anchor)  # solid
    assert all("dots" in a for a in resolve("style:stripes", to="dots").anchor)  # --to still wins
    red = resolve("color:red", world_name="toy-v2")
    assert all(re.search(r"\bgray\b", a) and not re.search(r"\bred\b", a) for a in red.anchor)
    kiko = resolve("identity:kiko", world_name="toy-v2")
    species = world_v2.IDENTITIES["kiko"][0]
    assert all(f"a {species}" in a and "kiko" not in a.lower() for a in kiko.anchor)


def test_concepts_roster_round_trips_through_a_concept_file(tmp_path, capsys):
    from patchforge.cli import main

    out = tmp_path / "ids.yaml"
    assert main(["concepts", "--kind", "identity", "--except", "identity:kiko", "--out", str(out)]) == 0
    specs = load_concept_file(out)
    assert [s.key for s in specs] == [f"identity:{n}" for n in world.IDENTITIES if n != "kiko"]
    assert str(tmp_path) not in out.read_text()  # nothing private in a file meant to be shared
    assert main(["concepts", "--kind", "color", "--out", str(tmp_path / "c.txt")]) == 2  # checked first
    assert "ending in .yaml" in capsys.readouterr().err and not (tmp_path / "c.txt").exists()
    assert main(["concepts", "--kind", "identity", "--concept", "object:star"]) == 2  # nothing left
