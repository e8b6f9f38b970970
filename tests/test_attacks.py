"""Attacks: text variants are what they claim, soft prompts are differentiable and land where they
should, robust training runs; on the trained toy model the soft-prompt attack brings back a concept
suppressed only by a negative prompt and finds nothing the base model cannot make."""
from pathlib import Path

import numpy as np
import pytest
import torch

from patchforge.pipeline.soft_tokens import SoftPrefix, SoftPrompt
from patchforge.eval import attacks, evaluation
from patchforge.eval.attacks.ring_a_bell import concept_pairs, concept_vector, ring_a_bell
from patchforge.eval.attacks.soft_prompt import soft_prompt_attack
from patchforge.eval.attacks.unlearndiff import target_latents
from patchforge.pipeline.soft_tokens import prefix_objective, unlearndiff_attack
from patchforge.core import worlds
from patchforge.pipeline.sampling import generate_latents
from patchforge.eval.text_attacks import misspell
from patchforge.toyworld import world


class Bright:
    """A stand-in judge for the plumbing tests: "the concept" is a bright image."""

    def detect(self, images, concept):
        return [float(im.mean() > 127) for im in images]


def test_text_attacks_are_what_they_claim():
    from patchforge.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for concept in ("stripes", "star", "kiko", "red"):
        variants = worlds.get("toy").text_attacks(concept, n=3)
        assert set(variants) == {"misspelling", "paraphrase", "described", "padding"}
        for p in variants["misspelling"] + variants["described"]:
            assert concept not in p.lower(), (concept, p)
        for ps in variants.values():
            assert len(ps) == 3
            for p in ps:
                assert len(tok(p).input_ids) <= tok.model_max_length, p
    assert misspell("stripes") != "stripes"


def test_concept_images_show_their_concept_for_every_kind():
    """The inversion and partial-denoising sources: real renders of the concept, for every kind
    (identity once looped forever here: its scenes have no style)."""
    for concept in ("stripes", "star", "red", "kiko"):
        images = worlds.get("toy").concept_images(concept, 3)
        assert images.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        assert not np.array_equal(images[0], images[1])


def test_soft_prompt_is_appended_and_differentiable():
    from tiny_pipelines import tiny_sd1

    pipe = tiny_sd1()
    soft = SoftPrompt(pipe, n_tokens=3)
    emb = soft.encode(pipe, ["a red circle", "a star"])
    assert emb.shape[:2] == (2, pipe.tokenizer.model_max_length)
    (grad,) = torch.autograd.grad(emb.pow(2).sum(), [soft.vectors])
    assert grad.abs().sum() > 0
    ids, pos = soft.token_ids(pipe.tokenizer, ["a star"])
    n_words = len(pipe.tokenizer("a star").input_ids) - 1  # BOS + words
    assert pos.tolist() == [[n_words, n_words + 1, n_words + 2]]
    assert ids[0, n_words + 3].item() == pipe.tokenizer.eos_token_id


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_robust_training_runs(family, tmp_path, monkeypatch):
    """--robust on every family: a suffix on SD 1.x, a prefix in each text encoder elsewhere; the target
    rows the method sees are the attacked encoding, not the plain one."""
    from tiny_pipelines import BUILDERS

    from patchforge.train.robust import RobustConfig, wrap_trainer
    from patchforge.train.loop import TrainConfig, train_patch

    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    pipe = BUILDERS[family]()
    seen = {}

    def robust(trainer):
        wrap_trainer(trainer, RobustConfig(inner_steps=1))
        seen["trainer"] = trainer

    cfg = TrainConfig(steps=2, batch=2, progress=False, options={"n_refs": 2, "ref_steps": 2})
    path, summary = train_patch(["style:stripes"], "fmn", config=cfg, pipe=pipe, robust=robust,
                                out=tmp_path / "p.safetensors")
    assert path.exists() and all(np.isfinite(summary["losses"]))
    trainer = seen["trainer"]
    assert trainer.robust_stats["inner_steps"] >= 2
    attacked, plain = trainer.prompt_embeddings(["a star"], "target").emb, trainer.encode(["a star"], "target").emb
    assert attacked.shape == plain.shape and not torch.allclose(attacked, plain)


@pytest.mark.slow
def test_soft_prompt_beats_a_weak_patch_and_finds_no_absent_concept():
    """The attack works: the shipped stripes patch at weight 0.5 is a weak defence (stripes left in
    these 8 images: 25 %, the hardened default patch of 2026-12-07; the previous one left 37.5 %), and the
    soft suffix brings stripes back (62.5 %; 87.5 % on the previous patch). (A negative prompt "in stripes
    style" was the weak defence here until the 2026-11-23 rebuilds; those models ignore it: stripes stay at
    100 %.)"""
    from patchforge.toyworld.plugin import ToyJudge
    from patchforge.io.loading import load_forget_patch, unload_forget_patch
    from patchforge.core.pipeline_loading import load_pipeline

    pipe, judge = load_pipeline(None, device="cpu"), ToyJudge()
    prompts = [p.prompt for p in world.probes_for("stripes", world.TRAIN_SPLIT, n=4, seed=5)]
    rep, seeds = [p for p in prompts for _ in range(2)], [evaluation.SEED0, evaluation.SEED0 + 1] * 4
    name = load_forget_patch(pipe, Path(__file__).parents[1] / "patches" / "style-stripes.fmn.safetensors", weight=0.5)
    try:
        suppressed = np.mean(judge.detect(evaluation.generate(pipe, rep, seeds), "stripes"))
        torch.manual_seed(0)
        res = attacks.run_attacks(pipe, ["stripes"], judge, {"prompts": 4, "soft_steps": 40}, seeds=2,
                                  which=("soft_prompt",))
    finally:
        unload_forget_patch(pipe, name)
    asr = res["soft_prompt"]["metric"]["patched"]
    print(f"weak patch: stripes rate {suppressed:.3f}, soft-prompt ASR {asr:.3f}")
    assert suppressed <= 0.5, suppressed  # the defence does something
    assert asr >= suppressed + 0.25, (suppressed, asr)
    # no false successes: prompts the base renders without stripes give the attack nothing to recover
    plain = [p.prompt for p in world.probes_for("circle", world.TRAIN_SPLIT, n=4, seed=5) if "stripes" not in p.prompt]
    soft = soft_prompt_attack(pipe, plain, steps=40, n_tokens=4)
    with torch.no_grad():
        emb = soft.encode(pipe, plain)
    images = evaluation.generate(pipe, plain, [evaluation.SEED0] * len(plain), prompt_embeds=emb)
    assert np.mean(judge.detect(images, "stripes")) <= 0.25


# ---------------------------------------------------------------- published-strength attacks (fast, tiny pipelines)
PROMPTS = ["a red circle", "a blue star"]


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_soft_prefix_reaches_every_text_encoder(family):
    """The prefix lands before the words in each encoder the prompt goes through (SD3: two CLIPs and T5;
    FLUX: CLIP and T5), one independent set per prompt, differentiable into every set."""
    from tiny_pipelines import BUILDERS

    from patchforge.backbones import for_pipe
    from patchforge.pipeline.soft_tokens import SoftPrefix

    pipe = BUILDERS[family]()
    soft = SoftPrefix(pipe, n_tokens=3, n_sets=2)
    assert len(soft.vectors) == len(for_pipe(pipe).prompt_encoders()) == {"sd1": 1, "sd3": 3, "flux": 2}[family]
    cond = soft.encode(PROMPTS)
    plain = for_pipe(pipe).encode([f"a a a {p}" for p in PROMPTS], pipe.device)  # the words the vectors replace
    assert cond.emb.shape == plain.emb.shape and not torch.allclose(cond.emb, plain.emb)
    loss = cond.emb.pow(2).sum() + (cond.pooled.pow(2).sum() if cond.pooled is not None else 0)
    grads = torch.autograd.grad(loss, list(soft.parameters()))
    assert all(g[i].abs().sum() > 0 for g in grads for i in range(2))  # every encoder, every prompt's set
    with torch.no_grad():  # set 0 for both prompts: the second prompt's embedding changes
        shared = soft.encode(PROMPTS, sets=[0, 0])
    assert torch.allclose(shared.emb[0], cond.emb[0].detach(), atol=1e-3)  # batch-dependent float sums
    assert not torch.allclose(shared.emb[1], cond.emb[1].detach(), atol=1e-3)


def test_unlearndiff_lowers_its_own_objective():
    """Per prompt, the optimised prefix denoises that prompt's target images better than the starting
    prefix does, measured at timesteps and noise the optimisation never drew."""
    from tiny_pipelines import tiny_sd1

    pipe = tiny_sd1()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 target images per prompt
    start = SoftPrefix(pipe, 5, n_sets=2, seed=0)  # what unlearndiff_attack starts from (same seed)
    soft = unlearndiff_attack(pipe, PROMPTS, latents, steps=30, n_tokens=5, lr=0.05, seed=0)
    held_out = range(10_000, 10_008)
    before = torch.stack([prefix_objective(pipe, start, PROMPTS, latents, seed=s) for s in held_out]).mean(0)
    after = torch.stack([prefix_objective(pipe, soft, PROMPTS, latents, seed=s) for s in held_out]).mean(0)
    # a random tiny UNet barely listens to its text: the drop is small here (about 1e-4), large on the toy
    # model (test_unlearndiff_brings_the_toy_star_closer below)
    assert (after < before).all(), (before, after)


@pytest.mark.slow
def test_unlearndiff_brings_the_toy_star_closer():
    """On the shipped toy model with the star patch: per prompt, the prefix lowers the patched model's
    denoising loss on a real star image at held-out timesteps and noise (on the previous default's star
    patch: 0.108 -> 0.107 and 0.034 -> 0.019 after 20 steps)."""
    from patchforge.core.pipeline_loading import load_pipeline
    from patchforge.io.loading import load_forget_patch, unload_forget_patch

    pipe, toy = load_pipeline(None, device="cpu"), worlds.for_model(None)
    prompts = toy.attack_prompts("star", 2)
    name = load_forget_patch(pipe, Path(__file__).parents[1] / "patches" / "object-star.fmn.safetensors")
    try:
        latents = target_latents(pipe, prompts, 1, seed=0, source="world", world=toy, concept="star")
        start = SoftPrefix(pipe, 5, n_sets=2, seed=0)
        soft = unlearndiff_attack(pipe, prompts, latents, steps=20, n_tokens=5, lr=0.01, seed=0)
        held_out = range(10_000, 10_008)
        before = torch.stack([prefix_objective(pipe, start, prompts, latents, seed=s) for s in held_out])
        after = torch.stack([prefix_objective(pipe, soft, prompts, latents, seed=s) for s in held_out])
    finally:
        unload_forget_patch(pipe, name)
    assert (after.mean(0) < before.mean(0)).all() and after.mean() < 0.9 * before.mean(), (before, after)


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_new_attacks_change_the_generations(family):
    """unlearndiff's prefixes and Ring-A-Bell's concept vector change what the pipeline draws."""
    from tiny_pipelines import BUILDERS

    pipe = BUILDERS[family]()
    seeds = [0, 1]
    plain = evaluation.generate(pipe, PROMPTS, seeds, steps=2)
    latents = generate_latents(pipe, PROMPTS, seeds, steps=2)
    soft = unlearndiff_attack(pipe, PROMPTS, latents, steps=2, n_tokens=3, seed=0)
    with torch.no_grad():
        cond = soft.encode(PROMPTS)
    ud = evaluation.generate(pipe, PROMPTS, seeds, prompt_embeds=cond.emb, pooled_embeds=cond.pooled, steps=2)
    vector = concept_vector(pipe, ["a red star", "a blue star in stripes style"], ["a red", "a blue"])
    rab = ring_a_bell(pipe, PROMPTS, vector, eta=3.0)
    zero = ring_a_bell(pipe, PROMPTS, vector, eta=0.0)
    assert torch.allclose(zero.emb, for_pipe_encode(pipe, PROMPTS), atol=1e-6)  # eta 0: the prompts as they are
    rb = evaluation.generate(pipe, PROMPTS, seeds, prompt_embeds=rab.emb, pooled_embeds=rab.pooled, steps=2)
    for attacked in (ud, rb):
        assert attacked.shape == plain.shape and np.abs(attacked.astype(int) - plain).mean() > 0.5


def for_pipe_encode(pipe, prompts):
    from patchforge.backbones import for_pipe

    with torch.no_grad():
        return for_pipe(pipe).encode(prompts, pipe.device).emb


def test_run_attacks_reports_the_new_attacks(monkeypatch):
    """The plumbing on a catalogue concept: every new attack reports an ASR over prompts x seeds (Ring-A-Bell
    on prompts without the name), inversion_converged the steps it ran."""
    from tiny_pipelines import tiny_sd1

    from patchforge.pipeline import sampling as gen_module

    monkeypatch.setattr(gen_module, "STEPS", 2)
    pipe = tiny_sd1()

    budget = {"prompts": 2, "ud_steps": 2, "uds_steps": 2, "uds_images": 1, "rab_pairs": 3}
    res = attacks.run_attacks(pipe, ["object:car"], Bright(), budget, seeds=2, world=None,
                              which=("unlearndiff", "unlearndiff_strong", "ring_a_bell"))
    assert set(res) == {"unlearndiff", "unlearndiff_strong", "ring_a_bell"}
    for r in res.values():
        assert r["metric"]["n"] == 4 and 0 <= r["metric"]["patched"] <= 1
    pairs = concept_pairs(None, "object:car", 1)
    assert pairs and all("car" not in without for _, without in pairs)
    assert "5-token prefix, 2 steps, lr 0.01, 1 target image" in res["unlearndiff"]["metric"]["what"]  # published
    assert "8-token prefix" in res["unlearndiff_strong"]["metric"]["what"]
    # a concept world's concept (the toy world's prompts and real images on the tiny pipeline)
    res = attacks.run_attacks(pipe, ["star"], Bright(), {"prompts": 1, "inv_images": 2, "invc_max_steps": 12,
                                                         "invc_patience": 3, "invc_restarts": 2}, seeds=1,
                              world=worlds.get("toy"), which=("inversion_converged",))
    steps, got = res["inversion_converged"]["steps"], res["inversion_converged"]["metric"]
    assert len(steps) == 1 and len(steps[0]) == 2 and all(3 <= n <= 12 for n in steps[0])  # one concept, 2 runs
    assert got["n"] == 2 and f"steps taken: {steps}" in got["what"]  # 1 prompt x 1 seed, once per inversion


def test_inversion_until_plateau_stops_and_reports_its_steps():
    from patchforge.pipeline.soft_tokens import Plateau

    flat = Plateau(patience=5)
    assert [flat.done(1.0) for _ in range(6)] == [False] * 5 + [True]
    falling = Plateau(patience=5)
    assert not any(falling.done(0.9 ** i) for i in range(100))  # 10 % better every step: never done
    from tiny_pipelines import tiny_sd1

    from patchforge.pipeline.soft_tokens import invert_latents

    pipe = tiny_sd1()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    soft = invert_latents(pipe, latents, steps=300, patience=5)
    assert 5 <= len(soft.losses) < 300  # stopped on the plateau, before the cap
    assert len(invert_latents(pipe, latents, steps=7).losses) == 7  # no patience: exactly the steps


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inversion_is_a_prefix_where_a_suffix_cannot_go(family, monkeypatch):
    """With several text encoders, textual inversion learns "<v> a photo of" in each of them: the learnt
    tokens denoise their images better than the starting ones at timesteps and noise the optimisation
    never drew, and the attack runs end to end through the family's pooled embeddings."""
    from tiny_pipelines import BUILDERS

    from patchforge.backbones import Cond, for_pipe
    from patchforge.pipeline import sampling as gen_module
    from patchforge.pipeline.soft_tokens import invert_latents, soft_cond

    pipe = BUILDERS[family]()
    backbone = for_pipe(pipe)
    with torch.no_grad():
        latents = generate_latents(pipe, PROMPTS, [0, 1], steps=2)
    start = SoftPrefix(pipe, 2, seed=0)  # what invert_latents(prefix=True, seed=0) starts from
    soft = invert_latents(pipe, latents, steps=30, lr=0.05, seed=0, prefix=True)
    assert isinstance(soft, SoftPrefix) and len(soft.losses) == 30

    def held_out_loss(tokens):
        losses = []
        for s in range(10_000, 10_008):
            x_t, t, noise = backbone.noised(latents, torch.Generator().manual_seed(s))
            with torch.no_grad():
                pred = backbone.predict(x_t, t, soft_cond(pipe, tokens, ["a photo of"] * len(latents)))
            losses.append(torch.nn.functional.mse_loss(pred.float(), backbone.training_target(latents, noise, t)))
        return float(torch.stack(losses).mean())

    assert held_out_loss(soft) < held_out_loss(start)
    assert isinstance(soft_cond(pipe, soft, ["a star"]), Cond)

    monkeypatch.setattr(gen_module, "STEPS", 2)

    res = attacks.run_attacks(pipe, ["star"], Bright(), {"prompts": 1, "inv_images": 2, "inv_steps": 2}, seeds=2,
                              world=worlds.get("toy"), which=("inversion",))
    assert res["inversion"]["metric"]["n"] == 2


@pytest.mark.parametrize("budget, which, message", [
    ({"ud_stpes": 3}, None, "unknown budget key(s) ud_stpes"),
    ({}, ["unlearndif"], "unknown attack(s) unlearndif"),
    ({"ud_steps": 0}, None, "ud_steps must be a whole number >= 1"),
    ({"uds_tokens": 2.5}, None, "uds_tokens must be a whole number >= 1"),
    ({"ud_lr": -0.01}, None, "ud_lr must be a number > 0"),
    ({"rab_eta": "big"}, None, "rab_eta must be a number > 0"),
    ({"ud_source": "web"}, None, "ud_source must be 'base' or 'world'"),
])
def test_budget_errors_are_one_line(budget, which, message):
    import argparse

    from patchforge.errors import PatchforgeError

    patch = Path(__file__).parents[1] / "patches" / "object-star.fmn.safetensors"
    args = argparse.Namespace(patch=str(patch), budget=list(budget.items()), attack=which or [], model=None,
                              seeds=1, judge=None, out=None)
    with pytest.raises(PatchforgeError) as err:
        attacks.run_command(args)  # fails before any model loads
    assert message in str(err.value) and "\n" not in str(err.value)


EXAMPLE_ATTACK = '''
"""brightness_prompt: the target prompts with "bright" in front (a test attack)."""
from dataclasses import dataclass

from patchforge.pipeline.sampling import generate
from patchforge.eval.attacks import Attack, Outcome, knob, register


@register("brightness_prompt")
class BrightnessPrompt(Attack):
    order = 65

    @dataclass(frozen=True)
    class Budget:
        word: str = knob("bright", "bp_word", choices=("bright", "vivid"))

    def run(self, t):
        prompts = [f"{self.b.word} {p}" for p in t.rep]
        return Outcome(generate(t.pipe, prompts, t.rep_seeds), t.base_hits)

    def describe(self, extra):
        return f"ASR, '{self.b.word}' in front of the prompt"
'''


def test_a_new_attack_is_one_file(tmp_path, monkeypatch):
    """Dropping one file into the attacks package is all it takes: discovery registers it, its typed budget
    key is checked and listed, `--attack` help names it, and run_attacks runs it with the others."""
    from tiny_pipelines import tiny_sd1

    from patchforge.cli import build_parser
    from patchforge.pipeline import sampling as gen_module
    from patchforge.errors import PatchforgeError

    (tmp_path / "brightness_prompt.py").write_text(EXAMPLE_ATTACK)
    monkeypatch.setattr(attacks, "__path__", [*attacks.__path__, str(tmp_path)])
    monkeypatch.setattr(attacks, "ATTACKS", dict(attacks.ATTACKS))
    monkeypatch.delitem(__import__("sys").modules, "patchforge.eval.attacks.brightness_prompt", raising=False)
    assert "brightness_prompt" in attacks.available()
    assert attacks.default_budget()["bp_word"] == "bright"
    with pytest.raises(PatchforgeError, match="budget bp_word must be 'bright' or 'vivid'"):
        attacks.check_budget({"bp_word": "dark"})
    sub = next(a for a in build_parser("attack")._actions if a.dest == "verb").choices["attack"]
    help_text = " ".join(sub.format_help().split())  # what `patchforge attack --help` prints, unwrapped
    assert "brightness_prompt" in help_text and "bp_word=bright" in help_text
    assert "inversion_converged, unlearndiff_strong only when named" in help_text

    monkeypatch.setattr(gen_module, "STEPS", 2)

    res = attacks.run_attacks(tiny_sd1(), ["object:car"], Bright(), {"prompts": 2, "bp_word": "vivid"}, seeds=2,
                              world=None, which=("brightness_prompt", "unconditional"))
    assert list(res) == ["brightness_prompt", "unconditional"]  # in their order
    assert res["brightness_prompt"]["metric"]["n"] == 4
    assert res["brightness_prompt"]["metric"]["what"] == "ASR, 'vivid' in front of the prompt"


@pytest.mark.parametrize("name", attacks.available())
def test_every_registered_attack_runs_and_reports(name, monkeypatch):
    """Each attack in the registry (a new file included, without editing this test) runs at a tiny budget
    on a tiny pipeline and reports a rate over its generations with a description."""
    from tiny_pipelines import tiny_sd1

    from patchforge.pipeline import sampling

    monkeypatch.setattr(sampling, "STEPS", 2)

    tiny = {"prompts": 1, "soft_steps": 1, "inv_steps": 1, "inv_images": 2, "invc_max_steps": 2,
            "invc_patience": 1, "ud_steps": 1, "uds_steps": 1, "uds_images": 1, "rab_pairs": 2, "probe_images": 2}
    res = attacks.run_attacks(tiny_sd1(), ["star"], Bright(), tiny, seeds=1, world=worlds.get("toy"), which=(name,))
    assert res, f"{name} reported nothing"
    for r in res.values():
        m = r["metric"]
        assert m["n"] >= 1 and 0 <= m["patched"] <= 1 and m["what"]
