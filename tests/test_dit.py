"""Forget patches on diffusion transformers: tiny random SD3 and FLUX pipelines built from configs.

Stacking, weights, fuse/unfuse and unload on these families run in test_loading.py (parametrised
with sd3 and flux); here: the training bar through the CLI, every method on every family, the joint
attention recorder, the family checks, the kohya export of FLUX patches, Hub tags and the hand-written
sampling the attacks use."""
import json

import pytest
import torch

from patchforge.cli import main
from patchforge.errors import BaseModelMismatch, PatchforgeError, PatchFormatError
from patchforge.methods import available
from tiny_pipelines import BUILDERS, cached_patches, make_patch, run, tiny_sd1

FAMILIES = ["sd3", "flux"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "dit-cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny pipeline saved once as a diffusers folder (what --model takes)."""
    root = tmp_path_factory.mktemp("dit")
    out = {}
    for fam in FAMILIES:
        BUILDERS[fam]().save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def _load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fam", FAMILIES)
def test_train_cli_writes_a_patch_that_loads_and_changes_the_output(fam, folders, tmp_path, capsys):
    from patchforge.io.loading import load_forget_patch, unload_forget_patches
    from patchforge.io.patch_format import K_BASE_FAMILY, read_patch

    out = tmp_path / "p.safetensors"
    assert main(["train", "--model", str(folders[fam]), "--concept", "style:vangogh", "--steps", "3", "--batch", "2",
                 "--ref-images", "2", "--set", "ref_steps=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformer rows" in printed and "trained style:vangogh with fmn: 3 steps" in printed
    patch = read_patch(out)
    assert patch.components == ["transformer"]
    assert all(m.endswith(("add_k_proj", "add_v_proj")) for m in patch.modules("transformer"))
    assert patch.metadata[K_BASE_FAMILY].startswith(f"{fam}-like")

    pipe = _load(folders[fam])
    base = run(pipe)
    load_forget_patch(pipe, out)
    patched = run(pipe)
    assert (patched - base).abs().max() > 1e-6  # three steps move the output (a little)
    unload_forget_patches(pipe)
    assert torch.equal(run(pipe), base)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)  # plain diffusers, same file, same images
    assert torch.allclose(run(pipe), patched, atol=1e-6)


METHODS = available()  # every registered method: a new one is tested on the transformers without editing this file


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_every_dit_family(fam, method, tmp_path):
    from patchforge.io.loading import load_forget_patch
    from patchforge.io.patch_format import read_patch
    from patchforge.train.loop import TrainConfig, train_patch

    pipe = BUILDERS[fam]()
    cfg = TrainConfig(method=method, steps=2, batch=2, ref_images=2, progress=False, options={"ref_steps": 2})
    path, summary = train_patch(["style:vangogh"], method, None, cfg, pipe=pipe, out=tmp_path / "p.safetensors")
    patch = read_patch(path)
    if method == "redact":  # the CLIP encoders only (T5 has no LoRA path in diffusers)
        assert set(patch.components) == ({"text_encoder", "text_encoder_2"} if fam == "sd3" else {"text_encoder"})
    else:
        assert patch.components == ["transformer"]
    if method == "uce":
        # the two layers that read the prompt: the tokens' projection and the pooled embedding's
        assert summary["solve"]["layers"] == 2 and summary["solve"]["residual"] < 0.1
        assert set(patch.modules("transformer")) == {"context_embedder", "time_text_embed.text_embedder.linear_1"}
    else:
        assert len(summary["losses"]) == 2 and all(map(torch.isfinite, torch.tensor(summary["losses"])))
    base = run(pipe)
    load_forget_patch(pipe, path)
    assert (run(pipe) - base).abs().max() > 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_attention_recorder_computes_what_the_model_computes(fam):
    """FMN's recorder replaces the joint / single-stream attention processors: with recording on, the
    transformer's output must not change, and the recorded mass must be image queries -> text columns."""
    from patchforge.backbones import for_pipe

    pipe = BUILDERS[fam]()
    bb = for_pipe(pipe)
    cond = bb.encode(["a photo of a cat", "a red star"], "cpu")
    mask = bb.concept_mask(["a photo of a cat", "a red star"], ["cat"])
    assert mask.shape == (2, cond.emb.shape[1]) and mask[0].sum() >= 1 and mask[1].sum() == 0
    x0 = torch.randn(2, 4, 16, 16) if fam == "sd3" else torch.randn(2, 64, 16)
    x_t, t, _ = bb.noised(x0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = bb.predict(x_t, t, cond)
    rec = bb.attention_recorder()
    layers = bb.text_attention()
    saved = [(m, m.processor) for _, m in layers]
    for _, m in layers:
        m.set_processor(rec)
    try:
        rec.mask = mask
        recorded = bb.predict(x_t, t, cond)  # grad enabled: records
        rec.mask = torch.ones_like(mask)
        bb.predict(x_t, t, cond)
    finally:
        for m, proc in saved:
            m.set_processor(proc)
    assert torch.allclose(recorded, plain, atol=1e-5)
    assert len(rec.mass) == 2 * len(layers)  # one entry per layer and forward
    heads = layers[0][1].heads
    concept = rec.mass[0].view(2, heads, -1)
    assert concept[1].abs().max() == 0 and concept[0].min() > 0  # no "cat" in the second prompt
    text_share = rec.mass[len(layers)]
    assert (text_share > concept.flatten(0, 1)).all() and (text_share < 1).all()  # image tokens take the rest


def test_patches_are_checked_against_the_family(tmp_path):
    from patchforge.io.loading import load_forget_patch
    from patchforge.io.patch_format import read_patch, write_patch

    sd3 = BUILDERS["sd3"]()
    with pytest.raises(BaseModelMismatch, match="sd1-like"):
        load_forget_patch(sd3, cached_patches("sd1")[0])
    with pytest.raises(BaseModelMismatch, match="flux-like"):
        load_forget_patch(sd3, cached_patches("flux")[0])
    mixed = read_patch(cached_patches("sd3")[0])
    unet = read_patch(cached_patches("sd1")[0])
    mixed.state_dicts["unet"], mixed.lora_configs["unet"] = unet.state_dicts["unet"], unet.lora_configs["unet"]
    with pytest.raises(PatchFormatError, match="no model family"):
        write_patch(mixed, tmp_path / "mixed.safetensors")


def test_flux_kohya_export_is_exact_and_loads_in_diffusers(tmp_path):
    """The fused BFL layers (txt_attn_qkv, img_attn_qkv, linear1, ...) carry exactly the patch's change;
    diffusers' own kohya-FLUX converter reads the export back to the same images."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from patchforge.io.kohya import export_kohya
    from patchforge.io.loading import load_forget_patch
    from patchforge.io.patch_format import read_patch

    pipe = BUILDERS["flux"]()
    whole = make_patch(pipe, tmp_path / "w.safetensors", "concept", seed=4, rank=2, text=False,
                       targets=["to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "to_add_out"])
    fused, patch = load_file(str(export_kohya(whole, tmp_path / "w.kohya.safetensors"))), read_patch(whole)
    for layer, prefix, parts in (("single_blocks_0_linear1", "single_transformer_blocks.0.attn.",
                                  ["to_q", "to_k", "to_v"]),
                                 ("double_blocks_0_txt_attn_qkv", "transformer_blocks.0.attn.",
                                  ["add_q_proj", "add_k_proj", "add_v_proj"])):
        key = f"lora_unet_{layer}"
        rank = fused[f"{key}.lora_down.weight"].shape[0]
        delta = fused[f"{key}.lora_up.weight"] @ fused[f"{key}.lora_down.weight"] * fused[f"{key}.alpha"] / rank
        want = [patch.delta("transformer", prefix + p) if prefix + p in patch.modules("transformer")
                else torch.zeros(32, 32) for p in parts]
        assert torch.allclose(delta[:96], torch.cat(want), atol=1e-6)
        assert delta[96:].abs().max() == 0 if len(delta) > 96 else True  # linear1's MLP part: untouched

    # diffusers' converter knows only FLUX.1's real widths for linear1: the round trip uses double blocks
    double = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    src = make_patch(pipe, tmp_path / "p.safetensors", "concept", seed=3, rank=3, alpha=1.5, scale=0.2,
                     targets=double)
    out = export_kohya(src, tmp_path / "p.kohya.safetensors")
    with safe_open(str(out), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_attn_qkv.alpha",
            "lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight"} <= keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn") for k in keys)
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["ss_base_model_version"] == "flux1"

    base = run(pipe)
    load_forget_patch(pipe, src)
    ours = run(pipe)
    from patchforge.io.loading import unload_forget_patches

    unload_forget_patches(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.allclose(ours, base, atol=1e-3)
    assert torch.allclose(run(pipe), ours, atol=1e-5)

    with pytest.raises(PatchforgeError, match="no kohya layout"):
        export_kohya(cached_patches("sd3")[0], tmp_path / "sd3.kohya.safetensors")


def test_flux_kohya_export_carries_the_layers_outside_the_blocks_and_says_where_they_are_dropped(tmp_path, capsys):
    """uce edits the pooled CLIP vector's projection and (--targets text-in) the T5 tokens' projection: the export
    writes them as BFL's vector_in.in_layer and txt_in (what ComfyUI and kohya name them), exactly; diffusers'
    kohya-FLUX reader drops those keys (measured: it loads only the block's layer here), and export says so."""
    from safetensors.torch import load_file

    from patchforge.io.patch_format import read_patch

    pipe = BUILDERS["flux"]()
    src = make_patch(pipe, tmp_path / "p.safetensors", "concept", seed=5, rank=2, alpha=1.0, text=False,
                     targets=r"context_embedder|time_text_embed\.text_embedder\.linear_1|"
                             r"transformer_blocks\.0\.attn\.add_k_proj")
    assert main(["export", str(src), "-o", str(tmp_path / "p.kohya.safetensors")]) == 0
    note = capsys.readouterr().err
    assert "diffusers' load_lora_weights drops them" in note and "lora_unet_txt_in" in note
    fused, patch = load_file(str(tmp_path / "p.kohya.safetensors")), read_patch(src)
    for key, module in (("lora_unet_vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
                        ("lora_unet_txt_in", "context_embedder")):
        delta = fused[f"{key}.lora_up.weight"] @ fused[f"{key}.lora_down.weight"] * fused[f"{key}.alpha"] / \
            fused[f"{key}.lora_down.weight"].shape[0]
        assert torch.allclose(delta, patch.delta("transformer", module), atol=1e-6)
    pipe.load_lora_weights(str(tmp_path / "p.kohya.safetensors"), adapter_name="x")
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert "context_embedder" not in loaded and "transformer_blocks.0.attn.add_k_proj" in loaded  # what the note says
    assert main(["export", str(cached_patches("flux")[0]), "-o", str(tmp_path / "q.kohya.safetensors")]) == 0
    assert "lora_unet" not in capsys.readouterr().err  # a patch without them: no note


def test_merged_dit_patches_equal_the_stack(tmp_path):
    from patchforge.io.loading import load_forget_patch, unload_forget_patches
    from patchforge.io.patch_format import merge_patches, read_patch, write_patch

    pipe = BUILDERS["sd3"]()
    p1, p2, _ = cached_patches("sd3")
    load_forget_patch(pipe, p1)
    load_forget_patch(pipe, p2, weight=-0.5)
    stacked = run(pipe)
    unload_forget_patches(pipe)
    merged = write_patch(merge_patches([read_patch(p1), read_patch(p2)], [1.0, -0.5]), tmp_path / "m.safetensors")
    load_forget_patch(pipe, merged)
    assert torch.allclose(run(pipe), stacked, atol=1e-5)


def test_hub_card_names_the_family():
    from patchforge.io.hub import model_card
    from patchforge.io.patch_format import K_BASE_FAMILY, K_BASE_REPO_ID, read_patch

    patch = read_patch(cached_patches("flux")[0])
    patch.metadata[K_BASE_FAMILY], patch.metadata[K_BASE_REPO_ID] = "flux.1-dev", "black-forest-labs/FLUX.1-dev"
    card = model_card(patch, "me/forget")
    head = card.split("---")[1]
    assert "base_model: black-forest-labs/FLUX.1-dev" in head and "- flux" in head
    assert "stable-diffusion" not in head
    patch.metadata[K_BASE_FAMILY] = "sd3.5-medium"
    assert "- sd3" in model_card(patch, "me/forget").split("---")[1]


@pytest.mark.parametrize("fam", FAMILIES)
def test_partial_denoising_runs_the_family_sampler(fam):
    """The partial-denoising attack samples by hand: flow matching, packed latents, no CFG pair on FLUX-dev."""
    import numpy as np

    from patchforge.eval.attacks.probes import partial_denoise

    pipe = BUILDERS[fam]()
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    a = partial_denoise(pipe, images, 0.5, [1, 2], prompt="a red star")
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, partial_denoise(pipe, images, 0.5, [1, 2], prompt="a red star"))
    assert not np.array_equal(a, partial_denoise(pipe, images, 0.5, [3, 4], prompt="a red star"))


@pytest.mark.parametrize("fam", FAMILIES)
def test_dry_run_plans_a_dit_folder(fam, folders, capsys):
    assert main(["train", "--model", str(folders[fam]), "--concept", "style:vangogh", "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert f"on {fam}-like" in line and "transformer rows" in line and "32 px" in line
    assert ": 160 steps x" in line  # fmn's joint-attention default (FMNConfig.JOINT_ATTENTION)


def test_joint_attention_defaults_apply_only_where_the_user_set_nothing(folders):
    from patchforge.pipeline.plan import ModelFacts
    from patchforge.methods.fmn import FMNConfig
    from patchforge.train.loop import TrainConfig, family_config, method_config
    from patchforge.methods import get_method

    dit, toy = ModelFacts.from_folder(folders["sd3"]), ModelFacts.from_pipe(tiny_sd1())
    assert dit.joint_attention and not toy.joint_attention
    assert ModelFacts.from_pipe(BUILDERS["flux"]()).joint_attention
    hp = FMNConfig()
    joint = family_config(hp, TrainConfig(), dit)
    assert (joint.steps, joint.keep_weight, joint.warm_start) == (160, 3.0, "")
    fast = family_config(hp, TrainConfig(fast=True), dit)  # --fast there: JOINT_FAST, warm-started
    assert (fast.steps, fast.lr, fast.keep_weight, fast.warm_start, fast.teacher_pool) == (40, 6e-3, 3.0, "uce", 10)
    assert (fast.adv_rounds, fast.warm_preserve_weight) == (0, 8.0)
    assert (hp.steps, hp.keep_weight, hp.warm_start) == (20, 2.0, "uce")
    assert family_config(hp, TrainConfig(), toy) == hp  # a UNet keeps the defaults it was tuned with
    mine = TrainConfig(steps=7, options={"keep_weight": 1.5})
    mine_hp = family_config(method_config(get_method("fmn"), mine.options), mine, dit)
    assert (mine_hp.steps, mine_hp.keep_weight) == (20, 1.5)  # what the user set stays; the loop runs --steps 7


def test_robust_defaults_apply_only_where_the_user_set_nothing(folders):
    """--robust: fmn trains cold, with fresh teachers, for 80 steps (160 on joint attention)."""
    from patchforge.pipeline.plan import ModelFacts
    from patchforge.methods.fmn import FMNConfig
    from patchforge.train.loop import TrainConfig, family_config

    dit, toy = ModelFacts.from_folder(folders["sd3"]), ModelFacts.from_pipe(tiny_sd1())
    hp = FMNConfig()
    robust = family_config(hp, TrainConfig(robust=True), toy)
    assert (robust.steps, robust.warm_start, robust.teacher_pool) == (80, "", 0)
    joint = family_config(hp, TrainConfig(robust=True), dit)  # joint attention's own cold schedule
    assert (joint.steps, joint.warm_start, joint.teacher_pool, joint.lr) == (160, "", 0, hp.lr)
    mine = family_config(hp, TrainConfig(robust=True, options={"warm_start": "uce"}), toy)
    assert (mine.steps, mine.warm_start) == (80, "uce")


def test_fast_drops_the_hardening_and_the_plan_line_counts_it(folders):
    """--fast: fmn's warm start without hardening rounds (the previous default); the default's hardening
    attack is in the plan line, and no family that cannot run it (joint attention) or --robust gets it."""
    from patchforge.pipeline.plan import ModelFacts
    from patchforge.methods.fmn import FMNConfig, ForgetMeNot
    from patchforge.train.loop import TrainConfig, family_config, resolve_run
    from dataclasses import replace

    dit, toy = ModelFacts.from_folder(folders["sd3"]), ModelFacts.from_pipe(tiny_sd1())
    hp = FMNConfig()
    assert (hp.adv_rounds, hp.warm_preserve_weight, hp.adv_rows) == (2, 8.0, 0.5)
    fast = family_config(hp, TrainConfig(fast=True), toy)
    assert (fast.adv_rounds, fast.warm_preserve_weight, fast.adv_rows) == (0, 1.0, 0.0)
    assert ForgetMeNot.hardening(fast, 8) == (0, 0) and ForgetMeNot.hardening(hp, 8) == (40, 8)
    assert ForgetMeNot.hardening(hp, 2) == (40, 2)  # never more rows than a training step's batch
    assert family_config(hp, TrainConfig(robust=True), toy).adv_rounds == 0
    assert family_config(hp, TrainConfig(), dit).adv_rounds == 0
    line = resolve_run(["custom:a photo of a cat"], TrainConfig(progress=False), hp, toy, loaded=True).plan.line("fmn")
    assert "hardening 40 attack steps x 8 UNet rows with gradients" in line
    fast_line = resolve_run(["custom:a photo of a cat"], TrainConfig(progress=False, fast=True), hp, toy,
                            loaded=True).plan.line("fmn")
    assert "hardening" not in fast_line
    assert "needs a GPU" not in line  # the toy hardens in seconds on a CPU
    real = replace(toy, family="sd1")
    real_line = resolve_run(["custom:a photo of a cat"], TrainConfig(progress=False), hp, real, loaded=True,
                            device=torch.device("cpu")).plan.line("fmn")
    assert "the hardening needs a GPU to be practical at this size" in real_line and "--fast" in real_line


def test_soft_token_methods_say_they_cannot_run_on_dit():
    from patchforge.train.loop import TrainConfig, train_patch

    with pytest.raises(PatchforgeError, match="not sd3-like"):
        train_patch(["style:vangogh"], "fmn", None, TrainConfig(steps=1, batch=2, ref_images=2, progress=False,
                                                                 options={"ref_steps": 2, "invert_steps": 1}),
                    pipe=BUILDERS["sd3"]())


def test_the_families_have_their_defaults():
    from patchforge.backbones.flux import Flux
    from patchforge.backbones.sd3 import SD3
    from patchforge.backbones import release_defaults

    real = json.loads('{"num_layers": 19, "num_single_layers": 38, "joint_attention_dim": 4096, '
                      '"guidance_embeds": true}')
    assert Flux.family_from_config(real) == "flux.1-dev" and release_defaults("flux.1-dev").key == "flux"
    medium = {"num_layers": 24, "caption_projection_dim": 1536, "joint_attention_dim": 4096,
              "dual_attention_layers": [0, 1, 2]}
    assert SD3.family_from_config(medium) == "sd3.5-medium" and release_defaults("sd3.5-medium").key == "sd3"


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_denoiser_call_is_the_pipelines(fam):
    """predict() on the backbone's own prompt encoding gives what the pipeline's transformer call gives
    (timestep units, pooled vector, RoPE ids, guidance embedding, packed latents)."""
    from patchforge.backbones import for_pipe
    from patchforge.backbones.flux import GUIDANCE
    from patchforge.backbones import Cond

    pipe = BUILDERS[fam]()
    seen = {}

    def grab(module, args, kwargs, output):
        seen.setdefault("call", (kwargs, output[0]))

    handle = pipe.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        pipe("a red star", num_inference_steps=2, guidance_scale=GUIDANCE, output_type="latent", height=32, width=32,
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    kwargs, out = seen["call"]
    bb = for_pipe(pipe)
    cond = bb.encode(["a red star"], "cpu")
    if fam == "sd3":  # classifier-free guidance: [empty, prompt] in one batch
        cond = Cond.cat([bb.encode([""], "cpu"), cond])
    t = kwargs["timestep"] * (1000 if fam == "flux" else 1)
    assert torch.allclose(bb.predict(kwargs["hidden_states"], t, cond), out, atol=1e-5)


def test_fused_export_of_a_dit_patch(folders, tmp_path):
    from patchforge.io.export import export_pipeline
    from patchforge.io.loading import load_forget_patch

    pipe = _load(folders["sd3"])
    src = make_patch(pipe, tmp_path / "p.safetensors", "concept", seed=5)
    load_forget_patch(pipe, src)
    patched = run(pipe)
    out = export_pipeline(src, str(folders["sd3"]), tmp_path / "fused")
    assert torch.allclose(run(_load(out)), patched, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_fmn_re_steers_joint_attention(fam, tmp_path):
    """The attention term alone, on one batch: the LoRA on add_k/add_v moves image queries' attention off the
    concept's text tokens (the recorder's mass carries gradient to the text stream's K/V)."""
    from patchforge.train.loop import TrainConfig, train_patch

    options = {"ref_steps": 2, "map_weight": 0.0, "preserve_weight": 0.0, "keep_weight": 0.0, "overfit_batch": True}
    cfg = TrainConfig(steps=15, lr=1e-2, batch=2, ref_images=2, progress=False, options=options)
    _, s = train_patch(["style:vangogh"], "fmn", None, cfg, pipe=BUILDERS[fam](), out=tmp_path / "p.safetensors")
    assert s["losses"][-1] < s["losses"][0] / 3
