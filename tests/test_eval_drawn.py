"""What `patchforge eval` reports of what users see: what replaces the erased concept, what shows up
unprompted, specificity in and out of sample, the weight response. The end-to-end run uses a tiny
random pipeline and a scripted judge that reports what a "patched model" would draw (the concept while
no patch acts, its neighbour while one does at weight >= 0.5), so every expected number is known."""
import numpy as np
import pytest

from patchforge.pipeline import sampling as generation
from patchforge.errors import PatchforgeError
from patchforge.eval import drawn, evaluation, report
from patchforge.eval.rows import Generated, Row
from patchforge.toyworld import world
from patchforge.toyworld.plugin import ToyWorld

from test_evaluation import make_lora_patch


class ScriptedJudge:
    """Every image shows `before` (of its kind) while no patch acts at weight >= 0.5, `after` while one does."""

    name = "scripted"

    def __init__(self, pipe, before: str, after: str):
        self.pipe, self.before, self.after = pipe, before, after

    def _patched(self) -> bool:
        from patchforge.io.loading import list_forget_patches

        return any(p.active and p.weight >= 0.5 for p in list_forget_patches(self.pipe))

    def predict(self, images):
        label = self.after if self._patched() else self.before
        return {k: [label if k == world.kind_of(self.before) else world.NONE] * len(images) for k in world.KINDS}

    def detect(self, images, concept):
        return [x == concept for x in self.predict(images)[world.kind_of(concept)]]


@pytest.fixture(scope="module")
def kiko(tmp_path_factory):
    """A (no-op) Kiko patch judged as if the patched model drew Tobi, Kiko's protected neighbour."""
    from tiny_pipelines import tiny_sd1

    pipe = tiny_sd1()
    pipe.unet.register_to_config(sample_size=8)  # 16x16 images: the scripted judge never looks at them
    path = make_lora_patch(pipe, tmp_path_factory.mktemp("drawn") / "kiko.safetensors", concept="identity:kiko")
    steps, generation.STEPS = generation.STEPS, 2  # plumbing only
    try:
        result = evaluation.evaluate([path], pipe=pipe, judge=ScriptedJudge(pipe, "kiko", "tobi"), seeds=2, n=2,
                                     weights=[0, 0.25, 1, 1.25], progress=lambda m: None)
    finally:
        generation.STEPS = steps
    return path, result["patches"][0]


def test_a_patch_that_draws_the_neighbour_is_counted_as_neighbour(kiko):
    m = kiko[1]["metrics"]
    assert m["replacement.kept"]["base"] == 1 and m["replacement.kept"]["patched"] == 0
    assert m["replacement.neighbour"]["base"] == 0 and m["replacement.neighbour"]["patched"] == 1
    assert m["replacement.neighbour"]["ci_change"][0] == 1  # every unit moved
    for c in ("neutral", "other", "absent"):
        assert m[f"replacement.{c}"]["patched"] == 0, c
    assert kiko[1]["replacement_targets"]["kiko"] == {"label": "none", "from": "world", "to": None,
                                                      "neighbours": ["tobi", "mira"]}


def test_unprompted_appearance(kiko):
    m = kiko[1]["metrics"]
    # the scripted base shows Kiko everywhere, the patched model Tobi everywhere
    assert m["unprompted.target"]["base"] == 1 and m["unprompted.target"]["patched"] == 0
    other = m["unprompted.other_same_kind"]
    assert other["base"] == 0  # Kiko is the target: counted above, not here
    # Tobi is unasked on Mira prompts and shape prompts (no character may appear there), asked on Tobi's
    rows = [r for r in kiko[1]["images"]["rows"] if r.set in drawn.UNASKED_SETS]
    unasked = sum(r.expect.get("identity", "none") != "tobi" for r in rows) / len(rows)
    assert other["patched"] == pytest.approx(unasked) and 0 < unasked < 1


def test_specificity_is_split_into_in_and_out_of_sample(kiko):
    path, rep = kiko
    trained = evaluation.trained_prompts(path)
    rows, flags = rep["images"]["rows"], rep["images"]["in_sample"]
    for s, key in (("neighbour", "specificity.neighbours"), ("other_kind", "specificity.other_kinds")):
        ins = [r.prompt for r, f in zip(rows, flags) if r.set == s and f]
        outs = [r.prompt for r, f in zip(rows, flags) if r.set == s and not f]
        assert set(ins) <= trained and not set(outs) & trained
        assert len(outs) >= len(ins)
        assert rep["overlap"][s] == {"prompts": len(ins) + len(outs), "in_sample": len(ins),
                                     "out_of_sample": len(outs), "training_prompts_known": True}
        assert rep["metrics"][key]["n"] == 2 * len(outs) and rep["metrics"][f"{key}.in_sample"]["n"] == 2 * len(ins)
    # every canonical Kiko-neighbour prompt is a preserve prompt: today's rows alone would have no headline
    plain = ToyWorld().eval_rows(["kiko"], n=2)
    assert all(r.prompt in trained for r in plain if r.set == "neighbour")
    assert rep["overlap"]["neighbour"]["in_sample"] > 0


def test_weight_response(kiko):
    points = {p["weight"]: p["metrics"] for p in kiko[1]["weights"]}
    assert list(points) == [0, 0.25, 1, 1.25]
    for w in (0, 0.25):  # below the scripted judge's 0.5: the base's numbers, exactly
        assert all(m["change"] == 0 for m in points[w].values()), w
    for w in (1, 1.25):
        assert points[w]["efficacy"]["patched"] == 0 and points[w]["generality"]["patched"] == 0
        assert points[w]["specificity.neighbours"]["n"] == kiko[1]["metrics"]["specificity.neighbours"]["n"]
    assert points[1] == {k: kiko[1]["metrics"][k] for k in evaluation.WEIGHT_METRICS}  # the main run's numbers
    table = report.markdown([kiko[1]])
    for section in ("## What is drawn instead", "## Unprompted appearance", "## Specificity in and out of sample",
                    "## Weight response", "| 1.25 |"):
        assert section in table


def test_a_list_patch_reports_each_concept_and_what_replaces_it(tmp_path):
    from tiny_pipelines import tiny_sd1

    pipe = tiny_sd1()
    pipe.unet.register_to_config(sample_size=8)
    path = make_lora_patch(pipe, tmp_path / "two.safetensors", concept="identity:kiko; identity:mira")
    steps, generation.STEPS = generation.STEPS, 2
    try:
        rep = evaluation.evaluate([path], pipe=pipe, judge=ScriptedJudge(pipe, "kiko", "tobi"), seeds=1, n=2,
                                  progress=lambda m: None)["patches"][0]
    finally:
        generation.STEPS = steps
    per = rep["by_concept"]
    assert list(per) == ["kiko", "mira"]
    assert per["kiko"]["efficacy"]["base"] == 1 and per["kiko"]["efficacy"]["patched"] == 0
    # the patched model draws Tobi: Kiko's protected neighbour, for Mira another identity
    assert per["kiko"]["replacement.neighbour"]["patched"] == 1 and per["kiko"]["replacement.other"]["patched"] == 0
    assert per["mira"]["replacement.other"]["patched"] == 1 and per["mira"]["replacement.neighbour"]["patched"] == 0
    table = report.markdown([rep])
    assert "## Per concept" in table and "| mira | 0% (0%) |" in table and "| kiko | 0% (100%) |" in table
    # an identity's training prompts name nothing else: its compositional cell is empty, not a number
    assert per["kiko"]["specificity.compositional"]["n"] == 0 and "| compositional |" in table


def test_categories_and_neutral_from_to():
    w = ToyWorld()
    star = drawn.neutrals(w, ["star"], {})["star"]
    assert star["label"] == "circle" and star["from"] == "world"
    labels = ("star", "circle", "pentagon", "heart", "none")
    got = {lab: drawn.category(w, "star", lab, star["label"]) for lab in labels}
    assert got == {"star": "kept", "circle": "neutral", "pentagon": "neighbour", "heart": "other", "none": "absent"}
    # a patch trained `--to checker` (a neighbour of stripes) lands where it was sent: neutral, not neighbour
    to = drawn.neutrals(w, ["stripes"], {"stripes": "checker"})["stripes"]
    assert to["label"] == "checker" and to["from"] == "to"
    assert drawn.category(w, "stripes", "checker", to["label"]) == "neutral"
    assert drawn.category(w, "stripes", "solid", to["label"]) == "absent"
    assert drawn.neutrals(w, ["stripes"], {"stripes": "a blob"})["stripes"]["label"] is None
    assert drawn.neutrals(w, ["red"], {})["red"]["label"] is None  # no neutral colour


def test_replacement_shares_add_up_and_a_no_change_measures_nothing():
    w = ToyWorld()
    rows = [Row("efficacy", "a star", "star"), Row("generality", "a spiky shape", "star")]
    labels = np.array(["star", "pentagon", "circle", "none"], dtype=object)
    g = Generated(np.zeros((4, 1, 1, 3), np.uint8), {"hit": np.ones(4), "label:object": labels}, 0.0)
    m = drawn.replacement(w, rows, 2, g, g, drawn.neutrals(w, ["star"], {}))
    assert sum(x["base"] for x in m.values()) == pytest.approx(1)
    assert all(x["change"] == 0 for x in m.values())
    assert drawn.replacement(None, rows, 2, g, g, {}) == {}  # no world: nothing to report


def test_weights_are_checked_before_any_model_loads(tmp_path, capsys):
    from patchforge.cli import main

    for bad in ("-1", "5", "abc", "0,nan", "0,,1"):
        with pytest.raises(SystemExit) as exit_:  # refused while parsing: no model is loaded
            main(["eval", str(tmp_path / "missing.safetensors"), "--weights", bad])
        assert exit_.value.code == 2, bad
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --weights" in err, bad
    with pytest.raises(PatchforgeError, match="from 0 to 4"):
        evaluation.evaluate([tmp_path / "missing.safetensors"], weights=[0, 9])
    assert evaluation.check_weights([0, 0.5, 0.5, 1]) == [0.0, 0.5, 1.0]


def test_side_effects_name_what_the_patch_adds_on_the_targets_prompts(kiko):
    m = kiko[1]["metrics"]
    # the scripted patched model draws Tobi where Kiko was asked for: Tobi, of the identity kind, is a side effect
    tobi = m["side_effect.identity.tobi"]
    assert tobi["base"] == 0 and tobi["patched"] == 1
    assert [k for k in m if k.startswith("side_effect.")] == ["side_effect.identity.tobi"]
    assert "## Side effects" in report.markdown([kiko[1]])


def test_side_effects_skip_what_the_prompt_asked_for_and_the_neutral():
    w = ToyWorld()
    rows = [Row("efficacy", "a star", "star"), Row("generality", "a star in stripes style", "star",
                                                    {"style": "stripes"})]
    base = Generated(np.zeros((4, 1, 1, 3), np.uint8),
                     {"label:object": np.array(["star"] * 4, dtype=object),
                      "label:style": np.array(["none", "none", "stripes", "stripes"], dtype=object)}, 0.0)
    patched = Generated(base.images, {"label:object": np.array(["circle", "circle", "cross", "cross"], dtype=object),
                                      "label:style": np.array(["checker", "none", "stripes", "stripes"], dtype=object)},
                        0.0)
    m = drawn.side_effects(w, rows, 2, base, patched, ["star"], drawn.neutrals(w, ["star"], {}))
    # circle is the neutral (meant to appear); stripes were asked for; cross and checker were not
    assert sorted(m) == ["side_effect.object.cross", "side_effect.style.checker"]
    assert m["side_effect.style.checker"]["patched"] == pytest.approx(1 / 4)


def test_replacement_on_held_out_prompts_is_reported_apart(kiko):
    m, flags = kiko[1]["metrics"], kiko[1]["images"]["in_sample"]
    rows = kiko[1]["images"]["rows"]
    held = [r for r, f in zip(rows, flags) if r.set in drawn.TARGET_SETS and not f]
    if held and len(held) < sum(r.set in drawn.TARGET_SETS for r in rows):
        assert m["replacement_heldout.neighbour"]["n"] == 2 * len(held)
    else:
        assert not any(k.startswith("replacement_heldout.") for k in m)
