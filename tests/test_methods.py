"""Every method: runs on tiny SD1/SD2/SDXL pipelines, its loss falls on a fixed batch, the patch loads;
on the toy model a short run moves the target concept's rate down."""
import numpy as np
import pytest
import torch

from patchforge.methods import available
from patchforge.training import TrainConfig, train_patch
from tiny_pipelines import BUILDERS, run

METHODS = available()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


@pytest.mark.parametrize("method", METHODS)
def test_method_loss_falls_and_patch_loads(method, tmp_path):
    from patchforge.loading import load_forget_patch

    pipe = BUILDERS["sd1"]()
    cfg = TrainConfig(steps=8, batch=2, lr=2e-2, progress=False,
                      options={"ref_steps": 2, "fisher_samples": 2, "n_refs": 2, "overfit_batch": True})
    path, s = train_patch(["custom:a photo of a cat"], method, None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert s["losses"][-1] < s["losses"][0], s["losses"]
    before = run(pipe)
    load_forget_patch(pipe, path)
    assert not torch.allclose(before, run(pipe))


@pytest.mark.parametrize("kind,method", [("sd2", "fmn"), ("sdxl", "fmn"), ("sdxl", "redact"), ("sd2", "sa")])
def test_methods_run_on_other_families(kind, method, tmp_path):
    pipe = BUILDERS[kind]()
    cfg = TrainConfig(steps=2, batch=2, progress=False, options={"ref_steps": 2, "fisher_samples": 2, "n_refs": 2})
    path, s = train_patch(["custom:a photo of a cat"], method, None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert path.exists() and np.isfinite(s["losses"]).all()


TOY_STEPS = {"fmn": 30, "sa": 30, "aob": 30, "redact": 40, "esd": 30}


@pytest.mark.parametrize("method", METHODS)
def test_toy_short_run_lowers_the_target_rate(method, tmp_path):
    from patchforge.loading import load_forget_patch
    from patchforge.pipeline_loading import TOY_MODEL_DIR, load_pipeline, toy_judge_path
    from patchforge.toyworld import world
    from patchforge.toyworld.judges import Judge

    if not (TOY_MODEL_DIR / "pipeline" / "model_index.json").exists():
        pytest.skip("toy model not built")
    pipe = load_pipeline(None, device="cpu")
    judge = Judge.load(toy_judge_path())
    prompts = [p.prompt for p in world.probes_for("stripes", world.TRAIN_SPLIT, n=8, seed=0)]

    def rate():
        gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
        img = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, generator=gens, output_type="np").images
        return np.mean([p == "stripes" for p in judge.predict((img * 255).round().astype(np.uint8))["style"]])

    base = rate()
    cfg = TrainConfig(steps=TOY_STEPS[method], progress=False)
    path, _ = train_patch(["style:stripes"], method, None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    load_forget_patch(pipe, path)
    assert rate() < base
