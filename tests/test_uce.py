"""uce, the closed-form method: a valid patch that loads and changes output, an SVD factoring that
reproduces the exact edit within the error it reports, and the edit being the least-squares optimum."""
import json

import pytest
import torch

from patchforge.train.loop import TrainConfig, train_patch
from tiny_pipelines import run, tiny_sd1, tiny_sd2_vpred


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def prepared_uce(pipe, options: dict | None = None, concepts=("custom:a photo of a cat",)):
    """A uce runner after prepare() (the exact deltas and their SVD), as train_patch builds it."""
    from patchforge.core.concepts import merge, resolve
    from patchforge.methods import get_method
    from patchforge.train.loop import Trainer

    cls = get_method("uce")
    specs = [resolve(c) for c in concepts]
    runner = cls(cls.Config(**(options or {})), Trainer(pipe, TrainConfig(progress=False), torch.device("cpu")),
                 specs, merge(specs))
    runner.prepare()
    return runner


def test_uce_writes_a_patch_that_loads_and_changes_output(tmp_path):
    from patchforge.io.loading import load_forget_patch, unload_forget_patches
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd1()
    path, s = train_patch(["custom:a photo of a cat"], "uce", None, TrainConfig(progress=False),
                          out=tmp_path / "p.safetensors", pipe=pipe)
    patch = read_patch(path)  # validates
    hp = json.loads(patch.metadata["patchforge.hyperparameters"])
    cfg = patch.lora_configs["unet"]
    assert patch.method == "uce" and s["steps"] == 0 and s["losses"] == []
    assert hp["rank"] == cfg["r"] == s["rank"] and hp["alpha"] == cfg["lora_alpha"]
    assert 0 <= hp["solve_residual"] < 0.05 and hp["solve_rank"] == s["rank"]
    assert all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in patch.modules("unet"))
    assert not getattr(pipe.unet, "peft_config", None) or "forget" not in pipe.unet.peft_config  # pipe left clean
    before = run(pipe)
    load_forget_patch(pipe, path)
    assert not torch.allclose(before, run(pipe))
    unload_forget_patches(pipe)
    assert torch.equal(before, run(pipe))


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_svd_factoring_reproduces_the_exact_edit_within_the_reported_error(tmp_path, alpha):
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd2_vpred()
    options = {"energy": 0.9, "max_rank": 3}  # truncate hard, so there is an error to report
    exact = prepared_uce(pipe, options).deltas
    cfg = TrainConfig(progress=False, alpha=alpha, options=options)
    path, s = train_patch(["custom:a photo of a cat"], "uce", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    patch = read_patch(path)
    num = den = worst = 0.0
    for name, delta in exact.items():
        err = float((patch.delta("unet", name) - delta).norm())
        num, den, worst = num + err ** 2, den + float(delta.norm()) ** 2, max(worst, err / float(delta.norm()))
    assert s["rank"] <= 3 and set(exact) == set(patch.modules("unet"))
    assert (num / den) ** 0.5 == pytest.approx(s["solve"]["residual"], rel=1e-3, abs=1e-6)
    assert worst == pytest.approx(s["solve"]["residual_max_layer"], rel=1e-3, abs=1e-6)
    assert s["solve"]["residual"] > 1e-4  # the truncation did leave something, and it was measured
    full = train_patch(["custom:a photo of a cat"], "uce", None,
                       TrainConfig(progress=False, options={"energy": 1.0, "max_rank": 64}),
                       out=tmp_path / "full.safetensors", pipe=pipe)[1]
    assert full["solve"]["residual"] < 1e-4  # all of the spectrum: the exact edit


def assert_least_squares_optimum(pipe, runner, preserve_weight: float, away: float, ridge: float,
                                 prompt_weight: torch.Tensor | None = None, pooled: bool = False):
    """The gradient of  sum_e w_e |W c_e - v*_e|^2 + pw sum_p |W c_p - W0 c_p|^2 + lam |W - W0|^2  vanishes at
    W0 + runner's ΔW, every layer (w_e: each target prompt's weight, on all its tokens; default 1).
    `pooled`: the layers that read the pooled embedding, one row per prompt (SD3 / FLUX)."""
    tr = runner.tr

    def rows(prompts):
        cond = tr.embed(prompts, base=True)
        return cond.pooled.double()[:, None] if pooled else cond.emb.double()

    c = rows(runner.target)
    wr = (torch.ones(len(runner.target)) if prompt_weight is None else prompt_weight).double()
    wr = wr.repeat_interleave(c.shape[1])[:, None]
    c, a = c.flatten(0, 1), rows(runner.anchor).flatten(0, 1)
    # the kept rows: the preserve prompts, the empty prompt and the anchors themselves (preserve_anchors)
    p = rows(list(dict.fromkeys(runner.preserve + [""] + runner.anchor))).flatten(0, 1)
    cov = (c * wr).T @ c + preserve_weight * p.T @ p
    lam = ridge * float(cov.diagonal().mean())
    modules = dict(runner.tr.backbone.denoiser.named_modules())
    names = {n for n, _ in runner.tr.backbone.pooled_text_in()}
    for name, delta in runner.deltas.items():
        if (name in names) != pooled:
            continue
        w0 = modules[name].weight.detach().double()
        d = delta.double()
        goal = a @ w0.T - away * (c @ w0.T - a @ w0.T)
        grad = ((c @ (w0 + d).T - goal) * wr).T @ c + preserve_weight * (p @ d.T).T @ p + lam * d
        scale = float((((c @ w0.T - goal) * wr).T @ c).norm())
        assert float(grad.norm()) < 1e-4 * scale, name


def test_uce_edit_is_the_ridge_least_squares_optimum():
    """The gradient of  sum_e |W c_e - v*_e|^2 + pw sum_p |W c_p - W0 c_p|^2 + lam |W - W0|^2  vanishes."""
    pipe = tiny_sd1()
    runner = prepared_uce(pipe, {"preserve_weight": 2.0, "away": 0.5, "ridge": 0.05})
    assert_least_squares_optimum(pipe, runner, preserve_weight=2.0, away=0.5, ridge=0.05)


def test_null_space_leaves_the_kept_rows_main_directions_exactly_unchanged():
    """With null_space, ΔW maps the kept rows' top eigen-directions to zero (SPEED's constraint), while the
    plain ridge solution moves them; the concept's own rows are still edited."""
    from patchforge.methods.uce import _null_projector

    pipe = tiny_sd1()
    held, plain = prepared_uce(pipe, {"null_space": 0.9}), prepared_uce(pipe)
    tr = held.tr
    p = tr.embed(list(dict.fromkeys(held.preserve + [""] + held.anchor)), base=True).emb.float().flatten(0, 1)
    top = torch.eye(p.shape[1]) - _null_projector(p, 0.9)  # projector onto the held directions
    assert 1 <= round(float(top.trace())) < p.shape[1]
    c = tr.embed(held.target, base=True).emb.float().flatten(0, 1)
    for name, delta in held.deltas.items():
        assert float((delta @ top).norm()) < 1e-4 * float(delta.norm()), name
        assert float((plain.deltas[name] @ top).norm()) > 1e-2 * float(plain.deltas[name].norm()), name
        assert float((c @ delta.T).norm()) > 0.1 * float((c @ plain.deltas[name].T).norm()), name


def test_away_by_kind_pushes_each_concepts_rows_by_its_kind():
    """A kind named in away_by_kind gets that push, every other kind `away`; a bad entry is one clear error."""
    from patchforge.errors import PatchforgeError

    pipe = tiny_sd1()
    two = ("custom:a photo of a cat", "style:vangogh")
    mixed = prepared_uce(pipe, {"away_by_kind": "style=0.25", "away": 1.0}, concepts=two)
    kinds = {t: s.kind for s in mixed.specs for t in s.target}
    assert sorted(set(mixed.row_away().tolist())) == [0.25, 1.0]
    assert all(w == (0.25 if kinds[t] == "style" else 1.0) for t, w in zip(mixed.target, mixed.row_away().tolist()))
    # one kind, pushed by name, is the same edit as `away` set to that push
    by_name = prepared_uce(pipe, {"away_by_kind": "custom=0.5"}).deltas
    plain = prepared_uce(pipe, {"away": 0.5}).deltas
    assert all(torch.allclose(by_name[n], plain[n], atol=1e-6) for n in plain)
    with pytest.raises(PatchforgeError, match="kind=number"):
        prepared_uce(pipe, {"away_by_kind": "style=half"})


def test_balance_gives_every_listed_concept_the_same_weight():
    """With balance, each concept's rows sum to the same weight (mean 1), and the edit is the optimum of
    the least squares with each erased row weighted so (its gradient vanishes)."""
    pipe = tiny_sd1()
    two = ("custom:a photo of a cat", "style:vangogh")  # 5 prompts against 6
    runner = prepared_uce(pipe, {"balance": True, "away_by_kind": ""}, concepts=two)  # one push: `away`
    owner, w = torch.tensor(runner.concept_of()), runner.row_weight()
    assert torch.bincount(owner).tolist() == [5, 6]
    assert torch.allclose(torch.stack([w[owner == i].sum() for i in range(2)]), torch.full((2,), len(w) / 2))
    assert abs(float(w.mean()) - 1) < 1e-6
    plain = prepared_uce(pipe, {"balance": False, "away_by_kind": ""}, concepts=two)
    assert torch.equal(plain.row_weight(), torch.ones(len(w)))
    assert any(not torch.allclose(runner.deltas[n], plain.deltas[n], atol=1e-6) for n in plain.deltas)
    assert_least_squares_optimum(pipe, runner, preserve_weight=6.0, away=1.0, ridge=0.1, prompt_weight=w)  # defaults


def test_uce_rank_comes_from_the_spectrum_and_respects_the_cap():
    pipe = tiny_sd1()
    loose, tight = prepared_uce(pipe, {"energy": 0.5}), prepared_uce(pipe, {"energy": 0.9999})
    assert 1 <= loose.lora_rank() < tight.lora_rank()
    assert prepared_uce(pipe, {"energy": 0.9999, "max_rank": 2}).lora_rank() == 2


def test_cli_concept_file_one_patch_or_one_per_concept(tmp_path, capsys):
    from patchforge.cli import main
    from patchforge.io.patch_format import read_patch

    folder = tmp_path / "tiny"
    tiny_sd1().save_pretrained(folder)
    roster = tmp_path / "roster.yaml"
    roster.write_text('- target: "a cat"\n- target: "a dog"\n- target: "a horse"\n')
    out = tmp_path / "one.safetensors"
    base = ["train", "--concept-file", str(roster), "--model", str(folder), "--method", "uce", "--quiet", "--device",
            "cpu"]
    assert main(base + ["--one-patch", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "solved in closed form" in text and "residual" in text
    assert len(json.loads(read_patch(out).metadata["patchforge.concepts"])) == 3
    assert main(base + ["--out", str(out)]) == 2  # three patches cannot share one --out
    capsys.readouterr()
    folder_out = tmp_path / "each"
    folder_out.mkdir()
    import os
    cwd = os.getcwd()
    os.chdir(folder_out)
    try:
        assert main(base) == 0
    finally:
        os.chdir(cwd)
    assert len(list((folder_out / "patches").glob("*.uce.safetensors"))) == 3
    assert "3 patches, 3 concepts" in capsys.readouterr().out


def test_fmn_warm_start_begins_from_the_uce_edit(tmp_path):
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd1()
    factors = prepared_uce(pipe, {"preserve_weight": 1.0, "preserve_anchors": False}).factors  # --fast's warm start
    # one step at a negligible learning rate (steps must be >= 1): AdamW moves each weight by ~lr
    cfg = TrainConfig(steps=1, lr=1e-12, rank=4, progress=False, fast=True,  # --fast: the plain closed form
                      options={"warm_start": "uce", "ref_steps": 2, "n_refs": 2})
    path, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    patch = read_patch(path)
    for name, (u, s, vh) in factors.items():  # (almost) no step taken: the LoRA is uce's rank-4 truncation
        assert torch.allclose(patch.delta("unet", name), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5), name


def test_a_hardening_round_fits_the_prefixed_rows_it_found():
    """adv_rounds: the prefix found against the plain edit enters the solve, so the hardened edit sends
    "<prefix> target" closer to its goal than the plain edit did (least squares over more rows), while the
    preserve prompts stay where the plain edit kept them (within a small share of their K/V)."""
    from patchforge.methods.uce import _edited, _shifted

    pipe = tiny_sd1()
    # at preserve weight 1 and without the anchors kept, where the erased rows lead the solve (on this tiny
    # random pipeline, at weight 8 the kept rows dominate and the hardened miss falls by less than 10 %)
    options = {"n_refs": 2, "adv_steps": 3, "adv_prompts": 2, "preserve_weight": 1.0, "preserve_anchors": False}
    plain = prepared_uce(pipe, options)
    hard = prepared_uce(pipe, {**options, "adv_rounds": 1})
    assert len(hard.prefixes) == 1 and not plain.prefixes
    layers = hard.tr.backbone.text_kv()
    soft, n = hard.prefixes[0], 2
    with torch.no_grad():
        c = soft.encode(hard.target[:n]).emb.float()
        a = _shifted(hard.tr.embed(hard.anchor[:n], base=True).emb.float(), soft.offsets[0], soft.k)

        def miss(deltas):
            total = 0.0
            for name, m in layers:
                w0 = m.weight.float()
                goal = a @ w0.T - (c @ w0.T - a @ w0.T)
                total += float(((c @ (w0 + deltas[name]).T) - goal).pow(2).sum())
            return total
        assert miss(hard.deltas) < 0.9 * miss(plain.deltas)
    # the hooks that let the attack see the edit leave the layers as they were
    before = layers[0][1](c)
    with _edited(layers, hard.deltas):
        assert not torch.allclose(layers[0][1](c), before)
    assert torch.equal(layers[0][1](c), before)


def test_shifted_anchor_lines_up_with_a_prefixed_prompt():
    from patchforge.methods.uce import _shifted

    a = torch.arange(6.0).view(1, 6, 1)  # BOS=0, words 1..4, pad 5
    out = _shifted(a, 1, 2)
    assert out.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_joint_attention_the_pooled_projection_gets_the_same_least_squares_edit(family, tmp_path):
    """SD3 / FLUX: the pooled prompt embedding reaches every block through one projection (the DiT toy draws
    the object from it); uce edits it with the closed form, in the patch beside the K/V, and not when the
    targets leave it out."""
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import BUILDERS

    pipe = BUILDERS[family]()
    options = {"n_refs": 2, "preserve_weight": 2.0, "away": 0.5, "ridge": 0.05, "denoiser_targets": "xattn-kv+pooled"}
    runner = prepared_uce(pipe, options)
    pooled = [n for n, _ in runner.tr.backbone.pooled_text_in()]
    assert pooled and set(pooled) <= set(runner.deltas) and all(runner.deltas[n].abs().max() > 0 for n in pooled)
    assert_least_squares_optimum(pipe, runner, preserve_weight=2.0, away=0.5, ridge=0.05, pooled=True)
    kv_only = prepared_uce(pipe, {**options, "denoiser_targets": "xattn-kv"})
    assert not set(pooled) & set(kv_only.deltas) and set(kv_only.deltas) == set(runner.deltas) - set(pooled)
    path, _ = train_patch(["custom:a photo of a cat"], "uce", None, TrainConfig(progress=False, options={"n_refs": 2}),
                          out=tmp_path / "p.safetensors", pipe=pipe)
    assert set(pooled) <= set(read_patch(path).modules("transformer"))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_in_edits_the_two_layers_that_read_the_prompt_by_least_squares(family):
    """SD3 / FLUX with --targets text-in: the tokens' projection into the text stream (context_embedder) gets the
    cross-attention solve on every token row, as a UNet's K/V do, the pooled projection its own; the joint K/V
    are left alone. A hardening round moves both."""
    from tiny_pipelines import BUILDERS

    pipe = BUILDERS[family]()
    options = {"n_refs": 2, "preserve_weight": 2.0, "away": 0.5, "ridge": 0.05, "denoiser_targets": "text-in"}
    runner = prepared_uce(pipe, options)
    tokens_in = {n for n, _ in runner.tr.backbone.token_text_in()}
    pooled = {n for n, _ in runner.tr.backbone.pooled_text_in()}
    assert tokens_in and set(runner.deltas) == tokens_in | pooled
    assert_least_squares_optimum(pipe, runner, preserve_weight=2.0, away=0.5, ridge=0.05)
    assert_least_squares_optimum(pipe, runner, preserve_weight=2.0, away=0.5, ridge=0.05, pooled=True)
    hard = prepared_uce(pipe, {**options, "adv_rounds": 1, "adv_steps": 2, "adv_prompts": 2})
    assert len(hard.prefixes) == 1
    assert all(not torch.allclose(runner.deltas[n], hard.deltas[n]) for n in runner.deltas)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_uce_default_patch_on_joint_attention_loads_whole_in_plain_diffusers(family, tmp_path):
    """uce's default targets (text-in) on SD3 / FLUX: the patch holds the two projections, and the pipeline's own
    load_lora_weights puts a LoRA on both, as load_forget_patch does."""
    from patchforge.io.loading import load_forget_patch
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import BUILDERS

    path, _ = train_patch(["custom:a photo of a cat"], "uce", None, TrainConfig(progress=False, options={"n_refs": 2}),
                          out=tmp_path / "p.safetensors", pipe=BUILDERS[family]())
    expected = {"context_embedder", "time_text_embed.text_embedder.linear_1"}
    assert set(read_patch(path).modules("transformer")) == expected
    for load in (lambda p: p.load_lora_weights(str(path), adapter_name="x"), lambda p: load_forget_patch(p, path)):
        pipe = BUILDERS[family]()
        load(pipe)
        assert {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")} == expected


def test_hardening_on_joint_attention_hardens_the_pooled_projection():
    """SD3 / FLUX: the prefix attack's pooled vectors join the pooled rows (the K/V read the transformer's own
    text stream, so their edit stays the plain one); without the pooled projection in the targets, and for
    null_space, a clear refusal."""
    from patchforge.errors import PatchforgeError
    from tiny_pipelines import tiny_sd3

    pipe = tiny_sd3()
    options = {"n_refs": 2, "adv_steps": 2, "adv_prompts": 2, "preserve_weight": 1.0, "preserve_anchors": False,
               "denoiser_targets": "xattn-kv+pooled"}
    plain, hard = prepared_uce(pipe, options), prepared_uce(pipe, {**options, "adv_rounds": 1})
    assert len(hard.prefixes) == 1 and not plain.prefixes
    pooled = [n for n, _ in hard.tr.backbone.pooled_text_in()]
    for name in plain.deltas:
        same = torch.allclose(plain.deltas[name], hard.deltas[name])
        assert same != (name in pooled), name
    with pytest.raises(PatchforgeError, match="adv_rounds"):
        prepared_uce(pipe, {"adv_rounds": 1, "n_refs": 2, "denoiser_targets": "xattn-kv"})
    with pytest.raises(PatchforgeError, match="null_space"):
        prepared_uce(pipe, {"null_space": 0.9, "n_refs": 2})


def test_fmn_holds_the_pooled_projection_at_its_warm_start(tmp_path):
    """SD3 / FLUX with the pooled projection among fmn's targets: the warm start's closed-form edit there is
    kept as solved (train_pooled=False, the default) while the steps move the K/V; train_pooled=True trains it;
    warm_start=uce-pooled starts that layer alone from the edit."""
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import tiny_sd3

    pipe, pooled = tiny_sd3(), "time_text_embed.text_embedder.linear_1"

    def deltas(lr: float, **options) -> dict:
        cfg = TrainConfig(steps=2, lr=lr, batch=2, progress=False, fast=True,
                          options={"ref_steps": 2, "n_refs": 2, "denoiser_targets": "xattn-kv+pooled", **options})
        out = tmp_path / f"{lr}{options}.safetensors"
        path, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=out, pipe=pipe)
        patch = read_patch(path)
        return {m: patch.delta("transformer", m) for m in patch.modules("transformer")}

    still, moved, trained = deltas(1e-12), deltas(1e-2), deltas(1e-2, train_pooled=True)
    assert still[pooled].abs().max() > 0 and torch.equal(still[pooled], moved[pooled])
    assert not torch.allclose(trained[pooled], still[pooled])
    assert any(not torch.allclose(still[m], moved[m]) for m in still if m != pooled)
    # warm_start=uce-pooled: that layer alone starts from the edit, the K/V from zero
    alone = deltas(1e-12, warm_start="uce-pooled")
    assert torch.allclose(alone[pooled], still[pooled])
    assert all(alone[m].abs().max() < 1e-6 for m in alone if m != pooled)


def test_hardening_rows_line_the_anchor_up_with_the_prefix_in_each_encoders_part():
    """SD3's token sequence is a CLIP part (the prefix after begin-of-text) then a T5 part (the prefix first):
    the anchor's words move k places right in each part from where the prefix sits there, the prefix's
    positions take the token before them; a part the prefix never entered (no T5: zeros) stays as it is."""
    from types import SimpleNamespace

    from patchforge.methods.uce import _prefix_aligned

    clip, t5, absent = object(), object(), object()
    soft = SimpleNamespace(k=2, offsets=[1, 0],
                           backbone=SimpleNamespace(prompt_encoders=lambda: [(clip, None), (t5, None)]))
    anchor = torch.arange(10.0)[None, :, None]  # positions: CLIP 0-5, T5 6-9
    assert _prefix_aligned(anchor, soft, [(clip, 6), (t5, None)])[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 6, 6, 6, 7]
    assert _prefix_aligned(anchor, soft, [(clip, 6), (absent, None)])[0, 6:, 0].tolist() == [6, 7, 8, 9]


def test_targets_pick_the_layers_uce_edits(tmp_path):
    """--targets reaches the closed form: on SD3 `xattn-kv+pooled` edits the joint K/V and the pooled projection
    instead of the default's two input projections; a set naming none of them is one clear error."""
    from patchforge.errors import PatchforgeError
    from patchforge.io.patch_format import read_patch
    from tiny_pipelines import tiny_sd3

    pipe = tiny_sd3()
    cfg = TrainConfig(progress=False, options={"n_refs": 2}, denoiser_targets="xattn-kv+pooled")
    path, _ = train_patch(["custom:a photo of a cat"], "uce", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    modules = set(read_patch(path).modules("transformer"))
    assert "time_text_embed.text_embedder.linear_1" in modules and "context_embedder" not in modules
    assert any(m.endswith("attn.add_k_proj") for m in modules)
    with pytest.raises(PatchforgeError, match="name no layer that reads the prompt"):
        train_patch(["custom:a photo of a cat"], "uce", None, TrainConfig(progress=False, options={"n_refs": 2},
                    denoiser_targets=r".*attn\.to_q"), out=tmp_path / "q.safetensors", pipe=pipe)
    assert not (tmp_path / "q.safetensors").exists()


def test_hold_twins_adds_each_target_prompts_neighbour_twin_to_the_kept_rows():
    """hold_twins: the twins ("a red star" -> "a red cross") are kept prompts, each once; off, they are not."""
    pipe = tiny_sd1()
    off = prepared_uce(pipe, {}, concepts=("style:vangogh",))
    on = prepared_uce(pipe, {"hold_twins": True}, concepts=("style:vangogh",))
    twins = [c for c in on.contrast_prompts if c]
    assert twins and not set(twins) <= set(off.kept_prompts())
    assert set(twins) <= set(on.kept_prompts()) and len(on.kept_prompts()) == len(set(on.kept_prompts()))
