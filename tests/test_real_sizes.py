"""Real-size concerns without real sizes: tensors past 2^24 elements, argument checks that run before
any model loads, the plan and its refusal, the concept world a model knows, the Hub repo id in patch
metadata, and the fused export."""
import json
import struct
import time

import pytest
import torch
from tiny_pipelines import make_patch, run, tiny_sd1

from patchforge.errors import PatchforgeError, UnknownConcept
from patchforge.train.loop import TrainConfig, train_patch

FAST = {"ref_steps": 2, "n_refs": 2}
BIG = 4100  # a 4100 x 4100 layer: 16,810,000 elements, past 2^24 = 16,777,216


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a pipeline fails the test: the checks must come first."""
    import diffusers

    import patchforge.core.pipeline_loading as pl

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pl, "load_pipeline", refuse)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


# ---------------------------------------------------------------- tensors past 2^24 elements
def _with_big_layer():
    pipe = tiny_sd1()
    pipe.unet.big = torch.nn.Linear(BIG, BIG, bias=False)  # one cheap layer past 2^24 elements
    with torch.no_grad():
        pipe.unet.big.weight.normal_(0, 0.02)
    return pipe


def test_fingerprint_samples_the_last_element_of_a_tensor_past_2_24():
    from patchforge.io.fingerprint import base_fingerprint
    from patchforge.io.patch_format import K_BASE_WEIGHTS

    pipe = _with_big_layer()
    assert pipe.unet.big.weight.numel() > 2 ** 24
    before = base_fingerprint(pipe)[K_BASE_WEIGHTS]  # a float32 linspace indexed past the end here
    with torch.no_grad():
        pipe.unet.big.weight[-1, -1] += 1.0  # the last element is one of the 16 samples
    assert base_fingerprint(pipe)[K_BASE_WEIGHTS] != before


def test_patch_on_a_layer_past_2_24_loads_fuses_and_restores_exactly(tmp_path):
    from peft import LoraConfig

    from patchforge.io.loading import (fuse_forget_patches, load_forget_patch, unfuse_forget_patches,
        unload_forget_patches)
    from patchforge.io.saving import save_patch_from_pipeline

    pipe = _with_big_layer()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["big", "to_k"], init_lora_weights=False),
                          adapter_name="t")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    path = save_patch_from_pipeline(pipe, tmp_path / "big.safetensors", adapter_name="t",
                                    metadata={"patchforge.concept": "big", "patchforge.method": "test"})
    pipe.delete_adapters("t")
    pipe.unload_lora_weights()
    w0, out0 = pipe.unet.big.weight.detach().clone(), run(pipe)
    load_forget_patch(pipe, path)  # the fingerprint check runs on the big layer here
    assert not torch.allclose(out0, run(pipe))
    unload_forget_patches(pipe)
    assert torch.equal(pipe.unet.big.weight, w0) and torch.equal(run(pipe), out0)
    load_forget_patch(pipe, path)
    fuse_forget_patches(pipe)  # merges B A into all 16.8 M weights
    assert not torch.allclose(pipe.unet.big.base_layer.weight, w0)
    unfuse_forget_patches(pipe)  # PEFT subtracts again: equal up to rounding
    unload_forget_patches(pipe)
    assert torch.allclose(pipe.unet.big.weight, w0, atol=1e-6)


# ---------------------------------------------------------------- argument checks, before any load
BAD = [  # (arguments, what the one error line names); argparse's types refuse some, check_train_args the rest
    (["--steps", "0"], "--steps"), (["--rank", "0"], "--rank"), (["--batch", "0"], "--batch"),
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--set", "preserve_weight=abc"], "preserve_weight=abc"), (["--set", "preserve_weight=NaN"], "finite"),
    (["--set", "ref_steps=2.5"], "whole number"), (["--set", "attn_weight=true"], "finite number"),
    (["--out", "/etc/hostname/p.safetensors"], "is a file"), (["--out", "/proc/nope/p.safetensors"], "cannot write"),
    (["--model", "/no/such/folder"], "no such folder"),
    (["--model", "a/b/c"], "not a Hub repo id"), (["--model", "nofolder"], "owner/name"),
    (["--concept-file", "/"], "not a file"), (["--resolution", "100"], "multiple of 8"),
    (["--ref-images", "0"], "--ref-images"), (["--max-memory", "-2"], "--max-memory"),
]


def _cli(argv, capsys) -> tuple[int, str]:
    from patchforge.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own refusal: usage line, then one error line
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("extra,message", BAD)
def test_cli_refuses_bad_arguments_in_one_line_before_loading(extra, message, capsys, no_model_load):
    rc, err = _cli(["train", "--concept", "style:stripes", *extra], capsys)
    lines = [x for x in err.splitlines() if not x.startswith("usage:") and not x.startswith(" ")]
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_python_entry_runs_the_same_checks(tmp_path, no_model_load):
    for cfg in (TrainConfig(steps=0), TrainConfig(lr=float("nan")), TrainConfig(options={"preserve_weight": "abc"})):
        with pytest.raises(PatchforgeError):
            train_patch(["style:stripes"], "fmn", None, cfg, out=tmp_path / "p.safetensors")
    with pytest.raises(PatchforgeError, match="no such folder"):
        train_patch(["style:vangogh"], "fmn", "/no/such/model", TrainConfig(), out=tmp_path / "p.safetensors")


def test_model_check_takes_folders_and_repo_ids(tmp_path):
    from patchforge.core.pipeline_loading import check_model, hub_repo_id

    check_model("stabilityai/stable-diffusion-xl-base-1.0")
    check_model(None)
    with pytest.raises(PatchforgeError, match="model_index.json"):
        check_model(str(tmp_path))
    assert hub_repo_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_repo_id(str(tmp_path)) is None and hub_repo_id(None) is None and hub_repo_id("toy") is None


# ---------------------------------------------------------------- plan and refusal
def _fake_folder(tmp_path, cross_dim=2048, te2=True, unet_params=2_567_463_684):
    """A pipeline folder with real configs and safetensors headers that declare the parameters
    (no weights behind them): what the plan reads before loading."""
    folder = tmp_path / "fake"
    index = {"_class_name": "StableDiffusionXLPipeline" if te2 else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"] if te2 else [None, None],
             "vae": ["diffusers", "AutoencoderKL"]}
    unet = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": cross_dim,
            "transformer_layers_per_block": [1, 2, 10], "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
    sizes = {"unet": unet_params, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
    for comp, n in sizes.items():
        (folder / comp).mkdir(parents=True)
        header = json.dumps({"w": {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
        (folder / comp / "diffusion_pytorch_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_run_that_cannot_fit_is_refused_before_loading(tmp_path, capsys, no_model_load):
    from patchforge.cli import main
    from patchforge.pipeline.plan import ModelFacts

    folder = _fake_folder(tmp_path)
    facts = ModelFacts.from_folder(folder)
    assert facts.family == "sdxl" and facts.native == 1024 and sum(facts.params.values()) > 3.4e9
    t0 = time.perf_counter()
    assert main(["train", "--concept", "style:vangogh", "--model", str(folder), "--max-memory", "4",
                 "--precision", "bf16", "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit" in err and "GiB" in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t0 < 10


def test_toy_family_defaults_are_the_toy_results_settings():
    from patchforge.pipeline.plan import ModelFacts, make_plan

    pipe = tiny_sd1()
    facts = ModelFacts.from_pipe(pipe)
    plan = make_plan(facts, torch.device("cpu"), precision="auto", resolution=None, batch=None, ref_images=None,
                     checkpointing=None, rows=lambda b: (2 * b, 3 * b), steps=80, ref_steps=10,
                     max_memory_gib=None, loaded=True, method_n_refs=16, user_n_refs=False)
    assert (facts.family, plan.batch, plan.resolution, plan.ref_images) == ("toy", 8, facts.native, 16)
    assert plan.dtype == torch.float32 and not plan.checkpointing


def test_plan_line_and_refusal_on_a_loaded_pipeline(tmp_path, capsys):
    pipe = tiny_sd1()
    before = run(pipe)
    cfg = TrainConfig(steps=1, batch=1, options=FAST, max_memory_gib=0.001)
    with pytest.raises(PatchforgeError, match="does not fit"):
        train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert torch.equal(run(pipe), before) and not (tmp_path / "p.safetensors").exists()
    # fresh teachers: 3 no-grad rows a step (a teacher pool computes them once, before the first step)
    cfg = TrainConfig(steps=1, batch=1, options={**FAST, "teacher_pool": 0}, gradient_checkpointing=True)
    _, s = train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("plan:")]
    assert len(line) == 1 and "1 steps x 2 UNet rows with gradients + 3 without" in line[0]
    assert "gradient checkpointing on" in line[0] and s["step_seconds"] > 0
    assert not pipe.unet.is_gradient_checkpointing  # left as it was


def test_gradient_checkpointing_trains_the_same_patch(tmp_path):
    """fmn's attention recorder sees the same operations when checkpointing re-runs the forward."""
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd1()
    patches = []
    for ck in (False, True):
        cfg = TrainConfig(steps=2, batch=2, options=FAST, progress=False, gradient_checkpointing=ck, lr=1e-2)
        p, _ = train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / f"{ck}.safetensors", pipe=pipe)
        patches.append(read_patch(p).state_dicts["unet"])
    assert patches[0].keys() == patches[1].keys()
    for k, v in patches[0].items():
        assert torch.allclose(v, patches[1][k], atol=1e-6), k


# ---------------------------------------------------------------- concepts fit the model
def test_concept_world_is_decided_by_the_model(tmp_path, capsys):
    from patchforge.core.concepts import resolve
    from patchforge.pipeline.concept_worlds import concept_world

    assert concept_world(None) == "toy" and concept_world("toy") == "toy"
    assert concept_world(str(_fake_folder(tmp_path))) == "real"
    assert concept_world("stabilityai/stable-diffusion-xl-base-1.0") == "real"
    small = tmp_path / "tiny"
    tiny_sd1().save_pretrained(small)
    assert concept_world(str(small)) == "toy"  # toy-sized test models speak the toy world

    red = resolve("color:red", world_name="real")
    assert red.world is None and all("red" in p for p in red.target) and red.paraphrases
    toy_red = resolve("color:red", world_name="toy")
    assert toy_red.world == "toy" and not set(red.target) & set(toy_red.target)  # SDXL never gets toy prompts
    with pytest.raises(UnknownConcept, match="toy-world concept"):
        resolve("style:stripes", world_name="real")
    capsys.readouterr()
    gogh = resolve("style:vangogh", world_name="toy")
    assert "never saw" in capsys.readouterr().err and gogh.world is None


def test_concepts_verb_lists_prompts(capsys, tmp_path):
    from patchforge.cli import main

    assert main(["concepts"]) == 0
    toy = capsys.readouterr().out
    assert "style:stripes" in toy and "vangogh" not in toy
    assert main(["concepts", "--model", str(_fake_folder(tmp_path)), "--concept", "style:vangogh"]) == 0
    real = capsys.readouterr().out
    assert "a painting in the style of Van Gogh" in real and "held out" in real and "stripes" not in real


# ---------------------------------------------------------------- provenance and fused export
def test_hub_repo_id_recorded_only_for_hub_bases(tmp_path):
    from patchforge.io.patch_format import K_BASE_REPO_ID, read_patch

    pipe = tiny_sd1()
    cfg = TrainConfig(steps=1, batch=1, options=FAST, progress=False)
    p, _ = train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / "a.safetensors", pipe=pipe)
    assert K_BASE_REPO_ID not in read_patch(p).metadata
    pipe.register_to_config(_name_or_path="someone/tiny-sd")  # what from_pretrained("someone/tiny-sd") records
    p, _ = train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / "b.safetensors", pipe=pipe)
    assert read_patch(p).metadata[K_BASE_REPO_ID] == "someone/tiny-sd"
    pipe.register_to_config(_name_or_path=str(tmp_path))  # a local folder is no repo id
    p, _ = train_patch(["custom:a cat"], "fmn", None, cfg, out=tmp_path / "c.safetensors", pipe=pipe)
    assert K_BASE_REPO_ID not in read_patch(p).metadata


def test_fused_export_matches_the_loaded_patch(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from patchforge.cli import main
    from patchforge.io.export import FUSED_INFO
    from patchforge.io.loading import load_forget_patch

    base = tmp_path / "base"
    pipe = tiny_sd1()
    pipe.save_pretrained(base)
    patch = make_patch(pipe, tmp_path / "p.safetensors", "a cat")
    out = tmp_path / "fused"
    argv = ["export", str(patch), "--format", "pipeline", "--model", str(base), "-o", str(out)]
    assert main(argv) == 0
    (out / "old.txt").write_text("replaced")  # an earlier export of its own is replaced whole
    assert main(argv) == 0
    fused = DiffusionPipeline.from_pretrained(out)
    fused.set_progress_bar_config(disable=True)
    plain = run(pipe)
    load_forget_patch(pipe, patch)
    assert torch.allclose(run(fused), run(pipe), atol=1e-4) and not torch.allclose(run(fused), plain)
    assert not (out / "old.txt").exists() and json.loads((out / FUSED_INFO).read_text())["weight"] == 1.0
    assert not getattr(fused.unet, "peft_config", None)  # a plain pipeline: no LoRA layers to unload
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nope.safetensors"), "--format", "pipeline", "--model", str(base),
                 "-o", str(out)]) == 2  # a failed export leaves the folder as it was
    assert (out / FUSED_INFO).exists()


def test_fingerprint_agrees_across_fp32_fp16_and_bf16_copies():
    """A patch trained on a bf16 copy (the plan's choice on capable devices) must not be reported as
    made for other weights when loaded into the fp32 or fp16 copy of the same checkpoint."""
    import copy

    from patchforge.io.fingerprint import base_fingerprint
    from patchforge.io.patch_format import K_BASE_WEIGHTS_V2
    from tiny_pipelines import BUILDERS

    pipe = BUILDERS["sd1"]()
    with torch.no_grad():  # values a float16 grid cannot hold exactly, as trained checkpoints have
        for p in pipe.unet.parameters():
            p.mul_(1.0 + 1e-3)
    fps = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        other = copy.deepcopy(pipe)
        for comp in ("unet", "text_encoder"):
            getattr(other, comp).to(dtype)
        fps[dtype] = base_fingerprint(other)[K_BASE_WEIGHTS_V2]
    assert len(set(fps.values())) == 1, fps
    with torch.no_grad():
        next(pipe.unet.parameters()).neg_()  # another checkpoint still differs
    assert base_fingerprint(pipe)[K_BASE_WEIGHTS_V2] != fps[torch.float32]


def test_dit_plan_counts_the_cpu_heap_growth_measured_on_the_toy():
    """The DiT toy's star patch peaked at 1.4 / 1.5 / 1.8 / 3.14 GiB RSS after 10 / 20 / 40 / 160 steps on a
    CPU (docs/real-models.md, 2026-12-06, /usr/bin/time -v); the plan must be at or above each, and a GPU
    run (no heap growth in host memory counted) must not pay for it."""
    from patchforge.pipeline import plan
    from patchforge.train.loop import model_facts

    facts = model_facts("patchforge/toy-sd3")
    for steps, measured in ((10, 1.4), (20, 1.5), (40, 1.8), (160, 3.14)):
        est = plan.estimate(facts, torch.float32, 32, 16, False, cpu_steps=steps)
        assert est.total / plan.GIB >= measured, steps
    assert plan.estimate(facts, torch.float32, 32, 16, False).total / plan.GIB < 1.5
