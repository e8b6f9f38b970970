"""The evaluation harness: a no-op patch measures nothing, a destroying patch is caught, numbers
reproduce from seeds, reports have stable keys. Plumbing runs on a tiny random pipeline with an
untrained judge (fast); the numbers that need a trained model use the embedded toy model if built."""
import json

import numpy as np
import pytest
import torch

from patchforge import evaluation
from patchforge.judging import ToyJudge, load_judge
from patchforge.errors import PatchforgeError
from patchforge.pipeline_loading import TOY_MODEL_DIR

TOY_BUILT = (TOY_MODEL_DIR / "pipeline" / "model_index.json").exists()


def make_lora_patch(pipe, path, concept="style:stripes", scale=0.0, seed=0, rank=4):
    """A forget patch made by hand: scale 0 -> B = 0 (exact no-op); scale > 0 -> random A and B."""
    from peft import LoraConfig

    from patchforge.patch_format import save_patch_from_pipeline

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="handmade")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".handmade." in name:
                p.normal_(0, scale) if scale > 0 else (p.normal_(0, 0.1) if "lora_A" in name else p.zero_())
    kind, name = concept.split(":")
    out = save_patch_from_pipeline(pipe, path, adapter_name="handmade", metadata={
        "patchforge.concept": concept, "patchforge.method": "handmade", "patchforge.training_seconds": "0.0",
        "patchforge.concepts": json.dumps([{"kind": kind, "name": name, "to": None}])})
    pipe.unet.delete_adapters("handmade")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from patchforge.toyworld.judges import JudgeNet, save_judge
    from tiny_pipelines import tiny_sd1

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_judge(JudgeNet(width=8).eval(), d / "judge.safetensors")
    pipe = tiny_sd1()
    judge = ToyJudge(d / "judge.safetensors")
    noop = make_lora_patch(pipe, d / "noop.safetensors")
    destroy = make_lora_patch(pipe, d / "destroy.safetensors", scale=0.5)
    steps, evaluation.STEPS = evaluation.STEPS, 2  # plumbing only: 2 denoising steps are enough
    try:
        both = evaluation.evaluate([noop, destroy], pipe=pipe, judge=judge, seeds=1, n=2, progress=lambda m: None)
        again = evaluation.evaluate([noop], pipe=pipe, judge=judge, seeds=1, n=2, progress=lambda m: None)
    finally:
        evaluation.STEPS = steps
    return both, again


def test_noop_patch_measures_nothing_and_numbers_reproduce(tiny):
    a, b = tiny
    for key, m in a["patches"][0]["metrics"].items():
        assert m["change"] == pytest.approx(0, abs=1e-9), key
        assert m["ci_change"][0] <= 1e-9 and m["ci_change"][1] >= -1e-9, key
    ja, jb = (evaluation.to_json(r["patches"][0]) for r in (a, b))
    assert ja["metrics"] == jb["metrics"]  # same seeds -> same numbers


def test_destroying_patch_is_caught(tiny):
    rep = tiny[0]["patches"][1]
    dist = rep["metrics"]["specificity.image_distance"]
    assert dist["patched"] > 0.05 and dist["ci_change"][0] > 0.02  # unrelated prompts changed, interval clear of 0


def test_reports_have_stable_keys_and_compare_table(tiny, tmp_path):
    files = evaluation.write_reports(tiny[0], tmp_path, command="patchforge eval --compare noop destroy")
    names = sorted(p.name for p in files)
    assert "compare.eval.md" in names and "noop.eval.png" in names and "destroy.eval.json" in names
    js = json.loads((tmp_path / "noop.eval.json").read_text())
    assert {"version", "metrics", "cost", "settings", "patch", "prompts"} <= set(js)
    for m in js["metrics"].values():
        assert {"base", "patched", "change", "ci_patched", "ci_change", "n", "better", "what"} == set(m)
    assert {"efficacy", "generality", "specificity.neighbours", "specificity.other_kinds", "specificity.compositional",
            "specificity.image_distance", "utility.frechet", "utility.alignment", "robustness.misspelling"} <= set(js["metrics"])
    assert {"patch_bytes", "training_seconds", "load_seconds", "inference_overhead"} <= set(js["cost"])
    table = (tmp_path / "compare.eval.md").read_text()
    assert "noop.safetensors" in table and "destroy.safetensors" in table


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert evaluation.frechet(a, a) == pytest.approx(0, abs=1e-6)
    assert evaluation.frechet(a, a + 2.0) == pytest.approx(5 * 4.0, rel=1e-6)


def test_judge_loading(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def judge(images, concept):\n    return [concept == 'x'] * len(images)\n")
    j = load_judge(f"python:{f}:judge")
    assert j.detect(np.zeros((2, 8, 8, 3), np.uint8), "x") == [True, True]
    with pytest.raises(PatchforgeError):
        load_judge("oracle")
    with pytest.raises(PatchforgeError):
        load_judge(f"python:{f}:missing")
    try:
        import nudenet  # noqa: F401
    except ImportError:
        with pytest.raises(PatchforgeError, match="pip install nudenet"):
            load_judge("nudenet")


def test_cli_errors(tmp_path, capsys):
    from patchforge.cli import main

    assert main(["eval"]) == 2
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "no patch" in capsys.readouterr().err


@pytest.mark.skipif(not TOY_BUILT, reason="the embedded toy model is not built")
def test_destroying_patch_fails_specificity_and_utility_on_toy_model(tmp_path):
    """At eval's default sample size (2 seeds, n=6: 24 general images). With 8 images the Fréchet
    interval straddled 0 for a destroyed model; at 24, projected on 16 components, it must not."""
    from patchforge.pipeline_loading import load_pipeline

    pipe = load_pipeline(None, device="cpu")
    destroy = make_lora_patch(pipe, tmp_path / "destroy.safetensors", scale=0.5)
    m = evaluation.evaluate([destroy], pipe=pipe, progress=lambda m: None)["patches"][0]["metrics"]
    assert m["specificity.other_kinds"]["ci_change"][1] < -0.2
    assert m["utility.alignment"]["ci_change"][1] < -0.3
    assert m["utility.frechet"]["ci_change"][0] > 0
