"""Toy world v2 as a concept world: a v2 model (a tiny one, built once per session: conftest.toy_v2_model) is
claimed by the v2 plug-in and not v1's, its concepts resolve to v2's prompts, training and eval on it use
them, and the eval reports v2's extra sets. A v1 model asked for a v2-only concept is a one-line error.
The tests on the built model are slow: about 80 CPU-seconds together (build, 2 training steps, an eval with
1 seed and 2 denoising steps); the others take a few seconds."""
import json

import pytest

from patchforge.core import concepts, worlds
from patchforge.pipeline import concept_worlds
from patchforge.pipeline import sampling as generation
from patchforge.toyworld import world as v1, world_v2 as v2
from patchforge.toyworld.plugin import ToyWorld, ToyWorldV2


def _v2_prompts(name: str, n: int = 16) -> set[str]:
    return {p.prompt for p in v2.probes_for(name, v2.TRAIN_SPLIT, n=n, seed=0)}


@pytest.mark.slow  # builds the tiny v2 model (once per session)
def test_each_toy_world_claims_only_its_own_models(toy_v2_model, tmp_path):
    from patchforge.toyworld.judges import JudgeNet, save_judge

    pipeline = toy_v2_model / "pipeline"
    assert [w.name for w in worlds.all_worlds() if w.knows_model(pipeline)] == ["toy-v2"]
    assert concept_worlds.concept_world(str(pipeline)) == "toy-v2"
    assert concept_worlds.concept_world(str(pipeline), family="toy") == "toy-v2"  # the model outranks its family
    # a folder beside v1 judges (no world in their metadata) is v1's, as is the embedded model
    save_judge(JudgeNet(width=8), tmp_path / "judges.safetensors")
    assert [w.name for w in worlds.all_worlds() if w.knows_model(tmp_path / "pipeline")] == ["toy"]
    assert worlds.for_model(None).name == "toy" and not worlds.get("toy-v2").knows_model(None)
    assert concept_worlds.concept_world(None, family="toy") == "toy"  # tiny toy-sized pipelines stay v1's


def test_concepts_resolve_in_the_models_world():
    kiko_v1 = concepts.resolve("identity:kiko", world_name="toy")
    kiko_v2 = concepts.resolve("identity:kiko", world_name="toy-v2")
    assert kiko_v2.world == "toy-v2" and set(kiko_v2.target) <= _v2_prompts("kiko")
    assert set(kiko_v1.target) <= {p.prompt for p in v1.probes_for("kiko", v1.TRAIN_SPLIT, n=16, seed=0)}
    assert any(" and " in p or "artwork" in p for p in set(kiko_v2.target) - set(kiko_v1.target))  # v2's scenes
    assert concepts.resolve("identity:kiko").world == "toy"  # a caller that does not know the base: as before
    for spec, word in (("art:mosaic", "mosaic artwork"), ("background:beach", "at the beach"),
                       ("implicit:bare", "bare")):
        s = concepts.resolve(spec, world_name="toy-v2")
        assert all(word in p for p in s.target) and not any(word in p for p in s.anchor), spec
        assert not any(word in p for p in s.preserve), spec


def test_v2_eval_rows_add_the_implicit_and_compositional_sets():
    rows = ToyWorldV2().eval_rows(["bare"], n=4)
    implicit = [r for r in rows if r.set == "implicit"]
    assert len(implicit) == 4 and all(r.concept == "bare" for r in implicit)
    assert not any(v2.names_concept(r.prompt, "bare") for r in implicit)  # it is never named there
    comp = [r for r in rows if r.set == "compositional"]
    assert comp and all("second" in r.keep and v2.names_concept(r.prompt, "bare") for r in comp)
    assert {"efficacy", "generality", "other_kind", "general", "attack:described"} <= {r.set for r in rows}
    # a second subject that is itself erased is not something to keep
    for r in ToyWorldV2().eval_rows(["red", "kiko"], n=4):
        assert not set(r.keep.values()) & {"red", "kiko"}
    # v1's rows have neither set
    assert not {"implicit", "compositional"} & {r.set for r in ToyWorld().eval_rows(["kiko"], n=4)}


def test_v2_text_attacks_use_held_out_wording():
    attacks = ToyWorldV2().text_attacks("mosaic", n=3)
    assert all("mosaic" not in p and "rendering" in p for p in attacks["described"])
    attacks = ToyWorldV2().text_attacks("beach", n=3)
    assert all("beach" not in p and "backdrop" in p for p in attacks["described"])


@pytest.fixture(scope="module")
def bare_patch(toy_v2_model, tmp_path_factory):
    """`patchforge train --model V2/pipeline --concept implicit:bare --steps 2`, with the prompt sets the
    method received."""
    from patchforge.cli import main
    from patchforge.train import loop

    seen = []
    out = tmp_path_factory.mktemp("bare") / "bare.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "merge", lambda specs: seen.append(concepts.merge(specs)) or seen[-1])
        rc = main(["train", "--model", str(toy_v2_model / "pipeline"), "--concept", "implicit:bare", "--steps", "2",
                   "--batch", "2", "--set", "ref_steps=2", "--set", "n_refs=2", "--out", str(out), "--device", "cpu",
                   "--quiet"])
    assert rc == 0 and out.exists()
    return out, seen


@pytest.mark.slow  # builds the tiny v2 model (once per session)
def test_training_on_a_v2_model_uses_v2_prompts(bare_patch):
    _, seen = bare_patch
    assert len(seen) == 1
    assert set(seen[0]["target"]) == _v2_prompts("bare")
    assert set(seen[0]["target"]) == set(ToyWorldV2().resolve("implicit", "bare", None, 0).target)


@pytest.mark.slow  # builds the tiny v2 model (once per session)
def test_eval_on_a_v2_model_reports_the_implicit_set(bare_patch, toy_v2_model, tmp_path, monkeypatch):
    from patchforge.cli import main

    monkeypatch.setattr(generation, "STEPS", 2)  # plumbing: 2 denoising steps
    patch, _ = bare_patch
    assert main(["eval", str(patch), "--model", str(toy_v2_model / "pipeline"), "--seeds", "1", "--prompts", "2",
                 "--out", str(tmp_path)]) == 0
    rep = json.loads(next(tmp_path.glob("*.eval.json")).read_text())
    rep = rep["patches"][0] if "patches" in rep else rep
    m = rep["metrics"]
    assert m["generality.implicit"]["n"] == 2 and m["generality.implicit"]["better"] == "lower"
    assert m["specificity.second_subject"]["n"] >= 1
    assert rep["settings"]["judge"] == "toy-judge-v2"
    implicit = [p["prompt"] for p in rep["prompts"] if p["set"] == "implicit"]
    assert len(implicit) == 2 and not any(v2.names_concept(p, "bare") for p in implicit)
    efficacy = [p["prompt"] for p in rep["prompts"] if p["set"] == "efficacy"]
    assert set(efficacy) <= _v2_prompts("bare", n=2)


def test_a_v1_model_asked_for_a_v2_concept_is_a_one_line_error(capsys):
    from patchforge.cli import main

    for spec, words in (("art:mosaic", "no art concepts"), ("identity:zuri", "no identity concept 'zuri'")):
        assert main(["train", "--concept", spec, "--steps", "1"]) == 2  # the default model: the v1 toy
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "the toy model (world v1)" in err and words in err and "--world v2" in err, err
    assert main(["train", "--concept", "art:mosiac", "--steps", "1"]) == 2
    assert "has no art concepts" in capsys.readouterr().err
    assert v1.KINDS == ("object", "color", "style", "identity")  # v1 unchanged
