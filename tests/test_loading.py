"""Loading, stacking, weights, unload, fuse on tiny SD 1.x, SD 2.x (v-prediction), SDXL, SD3 and FLUX pipelines."""
import subprocess
import sys
import warnings

import pytest
import torch

from pathlib import Path

import patchforge.loading as patchforge  # the same functions `patchforge.X` exposes lazily
from patchforge.errors import BaseModelMismatch, PatchforgeError, PatchFormatError
from tiny_pipelines import BUILDERS, cached_patches, run


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "sd3", "flux"])
def test_stack_weights_unload_fuse_restores_base(arch):
    pipe = BUILDERS[arch]()
    p1, p2, p3 = cached_patches(arch)
    base = run(pipe)

    # one patch through patchforge == the same file through plain diffusers (rank, alpha, text encoders)
    pipe.load_lora_weights(str(p1.parent), weight_name=p1.name, adapter_name="plain")
    plain = run(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe), base)

    patchforge.enable(pipe)
    n1 = pipe.load_forget_patch(p1)
    only1 = run(pipe)
    assert torch.allclose(only1, plain, atol=1e-6) and not torch.allclose(only1, base, atol=1e-3)

    n2 = pipe.load_forget_patch(p2, weight=0.5)
    n3 = pipe.load_forget_patch(p3, weight=-0.7)
    assert sorted(pipe.get_active_adapters()) == sorted([n1, n2, n3])  # diffusers alone keeps only n3
    assert [(p.concept, p.weight) for p in pipe.list_forget_patches()] == [("concept 0", 1.0), ("concept 1", 0.5),
                                                                           ("concept 2", -0.7)]
    stacked = run(pipe)
    assert not torch.allclose(stacked, only1, atol=1e-3)

    pipe.set_forget_patch_weight(n2, 0.0)
    pipe.set_forget_patch_weight(n3, 0.0)
    assert torch.allclose(run(pipe), only1, atol=1e-6)
    pipe.set_forget_patch_weight(n2, 0.5)
    pipe.set_forget_patch_weight(n3, -0.7)
    assert torch.allclose(run(pipe), stacked, atol=1e-6)

    pipe.unload_forget_patch(n2)
    assert [p.adapter_name for p in pipe.list_forget_patches()] == [n1, n3]
    two = run(pipe)
    pipe.fuse_forget_patches()
    assert torch.allclose(run(pipe), two, atol=1e-4)
    with pytest.raises(PatchforgeError, match="unfuse"):
        pipe.set_forget_patch_weight(n1, 0.3)
    pipe.unfuse_forget_patches()
    assert torch.allclose(run(pipe), two, atol=1e-5)

    pipe.unload_forget_patches()
    assert pipe.list_forget_patches() == [] and pipe.get_list_adapters() == {}
    assert torch.allclose(run(pipe), base, atol=1e-5)  # fuse/unfuse round trip: float error only

    # without fusing, unload-all gives the base outputs bit for bit
    pipe2 = BUILDERS[arch]()
    patchforge.load_forget_patch(pipe2, p1)
    patchforge.load_forget_patch(pipe2, p3, weight=0.3)
    patchforge.unload_forget_patches(pipe2)
    assert torch.equal(run(pipe2), base)


def test_user_loras_keep_their_weights():
    pipe = BUILDERS["sd1"]()
    p1, p2, _ = cached_patches("sd1")
    pipe.load_lora_weights(str(p2), adapter_name="mine")  # a user's ordinary LoRA
    pipe.set_adapters(["mine"], [0.6])
    patchforge.load_forget_patch(pipe, p1, weight=0.8, adapter_name="erase")
    ours = run(pipe)
    pipe.set_adapters(["mine", "erase"], [0.6, 0.8])  # the same thing done by hand with diffusers
    assert torch.allclose(run(pipe), ours, atol=1e-6)
    patchforge.unload_forget_patches(pipe)
    assert pipe.get_active_adapters() == ["mine"]
    mine = run(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(p2), adapter_name="mine")
    pipe.set_adapters(["mine"], [0.6])
    assert torch.allclose(run(pipe), mine, atol=1e-6)


def test_import_is_side_effect_free_and_opt_in_is_per_pipeline():
    code = ("import sys, patchforge; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules;"
            "assert callable(patchforge.enable) and callable(patchforge.load_forget_patch);"
            "from diffusers import StableDiffusionPipeline as P; assert not hasattr(P, 'load_forget_patch')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    a, b = BUILDERS["sd1"](), BUILDERS["sd1"]()
    patchforge.enable(a)
    assert hasattr(a, "load_forget_patch") and not hasattr(b, "load_forget_patch")
    assert not hasattr(type(a), "load_forget_patch")



def test_errors_leave_pipeline_as_it_was(tmp_path):
    pipe = BUILDERS["sd1"]()
    p1 = cached_patches("sd1")[0]
    name = patchforge.load_forget_patch(pipe, p1)
    before, listed = run(pipe), [p.adapter_name for p in patchforge.list_forget_patches(pipe)]

    with pytest.raises(BaseModelMismatch, match="sd2-like.*sd1-like") as err:  # SD2 patch on SD1
        patchforge.load_forget_patch(pipe, cached_patches("sd2")[0])
    assert "architecture" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BaseModelMismatch):  # SDXL patch on SD1
        patchforge.load_forget_patch(pipe, cached_patches("sdxl")[0])
    with pytest.raises(PatchforgeError, match="already loaded"):
        patchforge.load_forget_patch(pipe, p1, adapter_name=name)
    with pytest.raises(PatchforgeError, match="no forget patch named 'nope'"):
        patchforge.set_forget_patch_weight(pipe, "nope", 1.0)
    with pytest.raises(PatchforgeError, match="no forget patch named"):
        patchforge.unload_forget_patch(pipe, "nope")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p1.read_bytes()[:-100])
    with pytest.raises(PatchFormatError, match="truncated|corrupt"):
        patchforge.load_forget_patch(pipe, bad)
    with pytest.raises(PatchforgeError, match="no patch at"):
        patchforge.load_forget_patch(pipe, tmp_path / "missing.safetensors")
    assert torch.equal(run(pipe), before)
    assert [p.adapter_name for p in patchforge.list_forget_patches(pipe)] == listed


def test_fine_tune_warns_or_fails_strict():
    pipe = BUILDERS["sd1"]()
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.05)  # same architecture, other weights
    p1 = cached_patches("sd1")[0]
    before = run(pipe)
    with pytest.raises(BaseModelMismatch, match="fine-tune"):
        patchforge.load_forget_patch(pipe, p1, strict=True)
    assert torch.equal(run(pipe), before) and pipe.get_list_adapters() == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patchforge.load_forget_patch(pipe, p1)
    assert any("fine-tune" in str(w.message) for w in caught)


def test_sources_folder_and_weight_name(tmp_path):
    import shutil
    p1 = cached_patches("sd1")[0]
    (tmp_path / "sub").mkdir()
    shutil.copy(p1, tmp_path / "sub" / "pytorch_lora_weights.safetensors")
    shutil.copy(p1, tmp_path / "sub" / "other.safetensors")
    pipe = BUILDERS["sd1"]()
    patchforge.load_forget_patch(pipe, tmp_path, subfolder="sub")
    patchforge.load_forget_patch(pipe, tmp_path / "sub", weight_name="other.safetensors", adapter_name="b",
                                allow_duplicate=True)  # the same file twice: refused unless asked
    assert len(patchforge.list_forget_patches(pipe)) == 2


def test_bake_keeps_the_stack_and_drops_the_lora_layers():
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = BUILDERS["sd1"]()
    p1, p2, _ = cached_patches("sd1")
    patchforge.load_forget_patch(pipe, p1)
    patchforge.load_forget_patch(pipe, p2, weight=0.5)
    stacked = run(pipe)
    patchforge.bake_forget_patches(pipe)
    assert torch.allclose(run(pipe), stacked, atol=1e-4)  # the same images ...
    assert not any(isinstance(m, BaseTunerLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert patchforge.list_forget_patches(pipe) == []  # ... from plain layers, nothing left to unload
    from patchforge.loading import KEPT_ATTR

    assert not any(KEPT_ATTR in c.__dict__ for c in (pipe.unet, pipe.text_encoder))  # no copies of the base kept
    with pytest.warns(UserWarning, match="other weights"):  # baked weights are no longer the base's
        patchforge.load_forget_patch(pipe, p1)
    assert len(patchforge.list_forget_patches(pipe)) == 1
