"""The DiT toy (patchforge/toy-sd3): its build code on a tiny config, and the shipped model by name."""
import json

import numpy as np
import pytest
import torch

from patchforge.pipeline.sampling import generate
from patchforge.errors import PatchforgeError
from patchforge.core.pipeline_loading import TOY_MODEL_DIR, TOY_SD3_DIR, TOY_SD3_ID, load_pipeline, model_id, is_toy
from patchforge.toyworld import build_sd3
from patchforge.toyworld.build_sd3 import PaddedJointAttnProcessor, ToyDiTBuildConfig, build_toy_dit, encode

needs_unet_toy = pytest.mark.skipif(not (TOY_MODEL_DIR / "pipeline" / "model_index.json").exists(),
                                    reason="UNet toy not built")
shipped = pytest.mark.skipif(not (TOY_SD3_DIR / "pipeline" / "model_index.json").exists(),
                             reason="DiT toy not built")
TINY = dict(dataset_size=48, steps=4, batch_size=4, layers=1, heads=2, head_dim=8, checkpoint_every=2)


def _interrupted_then_resumed(out, cfg: dict, monkeypatch) -> dict:
    """Build into `out`, stopped right after its first checkpoint, then run again; the second run's report."""
    save = build_sd3._save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_sd3, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_toy_dit(out, ToyDiTBuildConfig(**cfg), log=lambda *_: None)
    monkeypatch.setattr(build_sd3, "_save_checkpoint", save)
    return build_toy_dit(out, ToyDiTBuildConfig(**cfg), log=lambda *_: None)


@needs_unet_toy
def test_folded_padding_is_the_full_padding():
    """Training folds SD3's 256 zero T5 tokens into two with a log(128) logit bias: same outputs."""
    torch.manual_seed(0)
    pipe = build_sd3.make_pipeline(TOY_MODEL_DIR, ToyDiTBuildConfig(layers=2, heads=2, head_dim=8))
    with torch.no_grad():
        for p in pipe.transformer.parameters():  # random everywhere: zero-initialised outputs would hide a bug
            p.normal_(0, 0.1)
    texts = ["a red star in stripes style", ""]
    full, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, device=torch.device("cpu"),
                                            do_classifier_free_guidance=False)
    folded, pooled_folded = encode(pipe, texts)
    assert full.shape[1] == folded.shape[1] + build_sd3.T5_PADDING - build_sd3.FOLDED
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([250.0, 900.0])
    with torch.no_grad():
        want = pipe.transformer(x, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        pipe.transformer.set_attn_processor(PaddedJointAttnProcessor())
        got = pipe.transformer(x, encoder_hidden_states=folded, pooled_projections=pooled_folded, timestep=t).sample
    assert want.abs().mean() > 0.1
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@needs_unet_toy
def test_tiny_build_loads_with_plain_diffusers_and_resumes(tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    straight = build_toy_dit(tmp_path / "a", ToyDiTBuildConfig(**TINY), log=lambda *_: None)
    assert straight["parameters"]["transformer"] > 0 and not (tmp_path / "a" / build_sd3.CHECKPOINT).exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "a" / "pipeline")
    assert pipe.vae.config.shift_factor is not None
    t5 = pipe.encode_prompt("a red star", None, None, device=torch.device("cpu"), do_classifier_free_guidance=False)[0]
    assert t5.shape[1] == 32 + build_sd3.T5_PADDING and not t5[:, 32:].any()  # the T5 slot gives SD3's zeros
    images = generate(pipe, ["a red star"], [0], steps=2)
    assert images.shape == (1, 32, 32, 3)
    assert np.array_equal(images, generate(pipe, ["a red star"], [0], steps=2))
    # the two CLIP slots hold one file; a build elsewhere carries the judges its VAE's images need
    assert (tmp_path / "a" / "pipeline" / "text_encoder_2" / "model.safetensors").is_symlink()
    assert (tmp_path / "a" / "judges.safetensors").exists()

    # interrupted after its first checkpoint, then run again: the same weights as the straight build
    assert _interrupted_then_resumed(tmp_path / "b", TINY, monkeypatch)["resumed_at_step"] == 2
    a = StableDiffusion3Pipeline.from_pretrained(tmp_path / "b" / "pipeline").transformer.state_dict()
    for name, tensor in pipe.transformer.state_dict().items():
        assert torch.equal(tensor, a[name]), name


def test_tiny_world_v2_build_trains_its_own_parts_and_resumes(tmp_path, monkeypatch):
    """World v2 has no UNet toy to borrow from: the build trains its VAE, text encoder and judges too."""
    from diffusers import StableDiffusion3Pipeline

    from patchforge.toyworld import build
    from patchforge.toyworld.judges import Judge

    monkeypatch.setattr(build, "judge_accuracy", lambda judge: {})  # thousands of renders: not tested here
    monkeypatch.setattr(build, "identity_accuracy_by_art", lambda judge: {})
    cfg = dict(TINY, world="v2", vae_steps=2, judge_steps=1)
    straight = build_toy_dit(tmp_path / "a", ToyDiTBuildConfig(**cfg), log=lambda *_: None)
    assert straight["base"].startswith("none") and straight["vae_final_loss"] is not None
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "a" / "pipeline")
    assert pipe.tokenizer.model_max_length == 48  # v2's captions are longer than v1's
    assert Judge.load(tmp_path / "a" / "judges.safetensors").net.world_name == "v2"
    assert np.array_equal(generate(pipe, ["a photo of Kiko at the beach"], [0], steps=2),
                          generate(pipe, ["a photo of Kiko at the beach"], [0], steps=2))

    assert _interrupted_then_resumed(tmp_path / "b", cfg, monkeypatch)["resumed_at_step"] == 2
    resumed = StableDiffusion3Pipeline.from_pretrained(tmp_path / "b" / "pipeline")
    for part in ("transformer", "text_encoder", "vae"):  # the text encoder trains with the transformer
        b = getattr(resumed, part).state_dict()
        for name, tensor in getattr(pipe, part).state_dict().items():
            assert torch.equal(tensor, b[name]), (part, name)


@needs_unet_toy
@pytest.mark.parametrize("world, message", [("v2", "was built from world v1, not v2"),
                                            ("v3", "unknown toy world 'v3'")])
def test_build_refuses_a_base_of_another_world_before_loading_it(tmp_path, world, message, monkeypatch):
    # the base's VAE, tokenizer and judges know only the world they were built from
    for make in ("make_pipeline", "make_own_pipeline"):
        monkeypatch.setattr(build_sd3, make, lambda *a: pytest.fail("loaded a model before checking"))
    with pytest.raises(PatchforgeError, match=message):
        build_toy_dit(tmp_path, ToyDiTBuildConfig(**TINY, world=world, base=str(TOY_MODEL_DIR)), log=lambda *_: None)


def test_cli_rejects_a_flag_of_the_other_family(capsys):
    from patchforge.cli import main

    assert main(["toy", "train", "--family", "sd3", "--unet-steps", "5"]) != 0
    assert "--unet-steps is no option of `toy train --family sd3`" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_cli_world_v2_build_needs_an_out_folder(capsys, family):
    from patchforge.cli import main

    assert main(["toy", "train", "--family", family, "--world", "v2"]) != 0  # never over the shipped v1 toy
    assert "a world v2 build needs --out" in capsys.readouterr().err


@shipped
def test_dit_toy_by_name_loads_and_generates_deterministically():
    from diffusers import StableDiffusion3Pipeline

    assert is_toy(TOY_SD3_ID) and model_id(TOY_SD3_ID) == TOY_SD3_ID
    assert model_id(str(TOY_SD3_DIR / "pipeline")) == TOY_SD3_ID
    pipe = load_pipeline(TOY_SD3_ID, device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    plain = StableDiffusion3Pipeline.from_pretrained(TOY_SD3_DIR / "pipeline")
    prompts = ["a red star in stripes style", "Kiko"]
    once = generate(pipe, prompts, [0, 1], steps=4)
    assert np.array_equal(once, generate(plain, prompts, [0, 1], steps=4))
    assert not np.array_equal(once[0], once[1])
    report = json.loads((TOY_SD3_DIR / "build_report.json").read_text())
    assert report["family"] == "sd3"


@shipped
def test_both_toys_fit_the_size_budget():
    """UNet toy + DiT toy <= 40 MB on disk (shared files are relative links, stored once)."""
    files = [f for f in TOY_MODEL_DIR.rglob("*") if f.is_file() and not f.is_symlink()]
    size = sum(f.stat().st_size for f in files)
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MB"
