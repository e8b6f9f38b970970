"""Attacks: text variants are what they claim, soft prompts are differentiable and land where they
should, robust training runs; on the trained toy model the soft-prompt attack brings back a concept
suppressed only by a negative prompt and finds nothing the base model cannot make."""
from pathlib import Path

import numpy as np
import pytest
import torch

from patchforge.eval import attacks, evaluation
from patchforge.core import worlds
from patchforge.eval.text_attacks import misspell
from patchforge.toyworld import world



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
    soft = attacks.SoftPrompt(pipe, n_tokens=3)
    emb = soft.encode(pipe, ["a red circle", "a star"])
    assert emb.shape[:2] == (2, pipe.tokenizer.model_max_length)
    (grad,) = torch.autograd.grad(emb.pow(2).sum(), [soft.vectors])
    assert grad.abs().sum() > 0
    ids, pos = soft.token_ids(pipe.tokenizer, ["a star"])
    n_words = len(pipe.tokenizer("a star").input_ids) - 1  # BOS + words
    assert pos.tolist() == [[n_words, n_words + 1, n_words + 2]]
    assert ids[0, n_words + 3].item() == pipe.tokenizer.eos_token_id


def test_robust_training_runs(tmp_path, monkeypatch):
    from tiny_pipelines import tiny_sd1

    from patchforge.train.robust import RobustConfig, wrap_trainer
    from patchforge.train.loop import TrainConfig, train_patch

    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    pipe = tiny_sd1()
    seen = {}

    def robust(trainer):
        wrap_trainer(trainer, RobustConfig(inner_steps=1))
        seen["trainer"] = trainer

    cfg = TrainConfig(steps=2, batch=2, progress=False, options={"n_refs": 2, "ref_steps": 2})
    path, summary = train_patch(["style:stripes"], "fmn", config=cfg, pipe=pipe, robust=robust,
                                out=tmp_path / "p.safetensors")
    assert path.exists() and all(np.isfinite(summary["losses"]))
    assert seen["trainer"].robust_stats["inner_steps"] >= 2


@pytest.mark.slow
def test_soft_prompt_beats_a_weak_patch_and_finds_no_absent_concept():
    """The attack works: the shipped stripes patch at weight 0.8 is a weak defence (stripes gone from
    these 8 images: 0 %; at 0.7 it leaves 50 %, at 0.9 12.5 %), and the soft suffix brings stripes back
    (75 %; at full weight it brings back none). (A negative prompt "in stripes style" was the weak defence here until
    the 2026-11-23 rebuilds; those models ignore it: stripes stay at 100 %.)"""
    from patchforge.toyworld.plugin import ToyJudge
    from patchforge.io.loading import load_forget_patch, unload_forget_patch
    from patchforge.core.pipeline_loading import load_pipeline

    pipe, judge = load_pipeline(None, device="cpu"), ToyJudge()
    prompts = [p.prompt for p in world.probes_for("stripes", world.TRAIN_SPLIT, n=4, seed=5)]
    rep, seeds = [p for p in prompts for _ in range(2)], [evaluation.SEED0, evaluation.SEED0 + 1] * 4
    name = load_forget_patch(pipe, Path(__file__).parents[1] / "patches" / "style-stripes.fmn.safetensors", weight=0.8)
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
    soft = attacks.soft_prompt_attack(pipe, plain, steps=40, n_tokens=4)
    with torch.no_grad():
        emb = soft.encode(pipe, plain)
    images = evaluation.generate(pipe, plain, [evaluation.SEED0] * len(plain), prompt_embeds=emb)
    assert np.mean(judge.detect(images, "stripes")) <= 0.25
