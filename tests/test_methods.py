"""Every method: runs on tiny SD1/SD2/SDXL pipelines, its loss falls on a fixed batch, the patch loads;
on the toy model a short run moves the target concept's rate down."""
import numpy as np
import pytest
import torch

from patchforge.methods import available, get_method
from patchforge.train.loop import TrainConfig, train_patch
from tiny_pipelines import BUILDERS, run

METHODS = available()
TRAINED = [m for m in METHODS if not get_method(m).closed_form]  # closed-form methods have no loss to fall


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def sa_fast(method: str) -> dict:
    return {"fisher_samples": 2} if method == "sa" else {}


def overfit_options(method: str) -> dict:
    """fmn's keep term starts at its minimum (0: the LoRA starts as a no-op) and can only grow, so the
    falling-loss check runs without it; test_fmn_contrast_and_projection_keeping checks the term."""
    return {"keep_weight": 0} if method == "fmn" else sa_fast(method)


@pytest.mark.parametrize("method", TRAINED)
def test_method_loss_falls_and_patch_loads(method, tmp_path):
    from patchforge.io.loading import load_forget_patch

    pipe = BUILDERS["sd1"]()
    cfg = TrainConfig(steps=8, batch=2, lr=2e-2, progress=False,
                      options={"ref_steps": 2, "n_refs": 2, "overfit_batch": True, **overfit_options(method)})
    path, s = train_patch(["custom:a photo of a cat"], method, None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert s["losses"][-1] < s["losses"][0], s["losses"]
    before = run(pipe)
    load_forget_patch(pipe, path)
    assert not torch.allclose(before, run(pipe))


@pytest.mark.parametrize("kind,method", [("sd2", "fmn"), ("sdxl", "fmn"), ("sdxl", "redact"), ("sd2", "sa")])
def test_methods_run_on_other_families(kind, method, tmp_path):
    pipe = BUILDERS[kind]()
    cfg = TrainConfig(steps=2, batch=2, progress=False, options={"ref_steps": 2, "n_refs": 2, **sa_fast(method)})
    path, s = train_patch(["custom:a photo of a cat"], method, None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert path.exists() and np.isfinite(s["losses"]).all()


TOY_STEPS = {"fmn": 50, "sa": 30, "aob": 50, "redact": 40, "esd": 60,  # enough to move the rate by more than one image
             "uce": None}  # closed form: no steps


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_toy_short_run_lowers_the_target_rate(method, tmp_path):
    from patchforge.io.loading import load_forget_patch
    from patchforge.core.pipeline_loading import load_pipeline, toy_judge_path
    from patchforge.toyworld import world
    from patchforge.toyworld.judges import Judge

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
    after = rate()
    print(f"{method}: stripes {base:.3f} -> {after:.3f} after {TOY_STEPS[method]} steps")
    assert after < base
    if method == "uce":  # the closed form erases outright (measured 8/8 -> 0/8), not just a little
        assert base >= 0.75 and after <= 0.25


def prepared_fmn(pipe, cfg, specs):
    """An fmn runner after prepare() (references, inversion), as train_patch builds it."""
    from patchforge.core.concepts import merge
    from patchforge.methods import get_method
    from patchforge.train.loop import Trainer

    method_cls = get_method("fmn")
    hp = method_cls.Config(**{k: v for k, v in cfg.options.items() if k in method_cls.Config.__dataclass_fields__})
    runner = method_cls(hp, Trainer(pipe, cfg, torch.device("cpu")), specs, merge(specs))
    runner.prepare()
    return runner


def test_fmn_inversion_finds_tokens_and_re_steers_them(tmp_path):
    """invert_steps > 0: textual inversion on the references gives K tokens whose attention columns
    are masked and driven down with the name's; the run trains and differs from one without."""
    from patchforge.core.concepts import resolve
    from patchforge.methods.fmn import INVERT_TEMPLATE

    pipe = BUILDERS["sd1"]()
    options = {"ref_steps": 2, "n_refs": 2, "invert_steps": 3, "invert_tokens": 2}
    cfg = TrainConfig(steps=4, batch=4, lr=2e-2, progress=False, options=options)
    specs = [resolve("custom:a photo of a cat")]
    runner = prepared_fmn(pipe, cfg, specs)
    cond, mask = runner.inverted
    n_template = len(pipe.tokenizer(INVERT_TEMPLATE).input_ids) - 1  # BOS + words; EOS follows the tokens
    assert mask.sum() == 2 and mask[0, n_template:n_template + 2].sum() == 2
    plain = pipe.encode_prompt([INVERT_TEMPLATE], "cpu", 1, False)[0]
    assert not torch.allclose(cond.emb, plain)  # the learnt tokens are in the embedding
    _, with_inv = train_patch(specs, "fmn", None, cfg, out=tmp_path / "a.safetensors", pipe=pipe)
    cfg.options = {**options, "invert_steps": 0}
    _, without = train_patch(specs, "fmn", None, cfg, out=tmp_path / "b.safetensors", pipe=pipe)
    assert np.isfinite(with_inv["losses"]).all() and with_inv["losses"] != without["losses"]


def test_fmn_inversion_on_sdxl_fails_clearly(tmp_path):
    from patchforge.errors import PatchforgeError

    cfg = TrainConfig(steps=1, batch=2, progress=False, options={"ref_steps": 2, "n_refs": 2, "invert_steps": 1})
    with pytest.raises(PatchforgeError, match="SD 1.x / 2.x"):
        train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / "p.safetensors",
                    pipe=BUILDERS["sdxl"]())
    assert not (tmp_path / "p.safetensors").exists()


def test_fmn_preserve_on_own_images_pairs_each_prompt_with_its_image(tmp_path):
    from patchforge.core.concepts import resolve
    from patchforge.errors import PatchforgeError

    pipe = BUILDERS["sd1"]()
    specs = [resolve("custom:a photo of a cat")]
    options = {"ref_steps": 2, "n_refs": 2, "preserve_on": "own"}
    cfg = TrainConfig(steps=2, batch=2, progress=False, options=options)
    runner = prepared_fmn(pipe, cfg, specs)
    assert len(runner.pres_refs) == len(runner.preserve)  # one base image per preserve prompt
    runner.tr.rng.seed(5)
    idx = runner.tr.pick(runner.preserve, 2)
    runner.tr.rng.seed(5)
    *_, x0 = runner.preserve_batch(runner.pres_refs, paired=True)
    assert torch.equal(x0, runner.pres_refs[idx])
    _, s = train_patch(specs, "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert np.isfinite(s["losses"]).all()
    cfg.options = {**options, "preserve_on": "elsewhere"}
    with pytest.raises(PatchforgeError, match="preserve_on"):
        train_patch(specs, "fmn", None, cfg, out=tmp_path / "q.safetensors", pipe=pipe)


def test_fmn_contrast_and_projection_keeping(tmp_path):
    """contrast rows name a neighbour on the target rows' own latents; the keep penalty is
    ||dW h||^2 / ||W h||^2 over the preserve tokens."""
    from patchforge.core.concepts import resolve
    from patchforge.core.lora import ADAPTER, lora_delta
    from patchforge.train.loop import inject_lora

    pipe = BUILDERS["sd1"]()
    specs = [resolve("style:vangogh")]  # a catalog concept with neighbours (Monet, Cezanne)
    # a cold start: the closed-form warm start would make the LoRA non-zero at init
    options = {"ref_steps": 2, "n_refs": 2, "contrast": 0.5, "keep_weight": 1.0, "warm_start": "", "teacher_pool": 0}
    cfg = TrainConfig(steps=2, batch=4, progress=False, options=options)
    runner = prepared_fmn(pipe, cfg, specs)
    assert all("Monet" in c or "Cezanne" in c for c in runner.contrasts)
    # the keep penalty: zero at LoRA init (B = 0), then exactly the mean relative change of K/V
    inject_lora(runner.tr, "xattn", False, 4, 4.0)
    runner.start()
    assert runner.keeper.penalty().item() == 0
    for layer, _ in runner.keeper.layers:
        torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=0.1)
    h = runner.tr.embed(runner.preserve + [c for c in dict.fromkeys(runner.contrast_prompts) if c],
                        base=True).emb.flatten(0, 1)
    direct = torch.stack([(h @ lora_delta(m).T).pow(2).sum() / (h @ m.base_layer.weight.T).pow(2).sum()
                          for m, _ in runner.keeper.layers]).mean()
    assert torch.allclose(runner.keeper.penalty(), direct, rtol=1e-4)
    runner.keeper.penalty().backward()
    assert all(m.lora_A[ADAPTER].weight.grad is not None for m, _ in runner.keeper.layers)
    runner.finish()
    _, s = train_patch(specs, "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=BUILDERS["sd1"]())
    assert np.isfinite(s["losses"]).all()


EXAMPLE_METHOD = '''
"""Erase by pulling the concept's prediction to the empty prompt's (a minimal method: one file)."""
from dataclasses import dataclass

import torch.nn.functional as F

from patchforge.methods import Method, MethodConfig, register


@dataclass
class ToEmptyConfig(MethodConfig):
    steps: int = 4


@register("to-empty")
class ToEmpty(Method):
    Config = ToEmptyConfig

    def prepare(self):
        self.refs = self.concept_refs()

    def loss(self, step):
        tr = self.tr
        idx = tr.pick(self.target, self.batch)
        x_t, t, _ = tr.noised(self.refs[[i % len(self.refs) for i in idx]])
        empty = tr.predict(x_t, t, tr.embed([""] * len(idx), base=True), base=True)
        return F.mse_loss(tr.predict(x_t, t, tr.embed([self.target[i] for i in idx], role="target")), empty), {}
'''


def test_a_new_method_is_one_file(tmp_path, monkeypatch):
    """Dropping one file into the methods package is all it takes: discovery registers it, the CLI's
    option check and the shared loop find it by name, and its patch loads."""
    import patchforge.methods as methods
    from patchforge.io.loading import load_forget_patch

    (tmp_path / "to_empty.py").write_text(EXAMPLE_METHOD)
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.delitem(__import__("sys").modules, "patchforge.methods.to_empty", raising=False)
    assert "to-empty" in methods.available()
    pipe = BUILDERS["sd1"]()
    cfg = TrainConfig(batch=2, lr=2e-2, progress=False, options={"ref_steps": 2, "n_refs": 2})
    path, s = train_patch(["custom:a photo of a cat"], "to-empty", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert s["method"] == "to-empty" and s["steps"] == 4
    before = run(pipe)
    load_forget_patch(pipe, path)
    assert not torch.allclose(before, run(pipe))
