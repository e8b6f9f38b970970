"""kohya export: keys, real alpha values, metadata; re-imported by diffusers it gives the same images."""
import pytest
import safetensors
import torch

from patchforge import cli
from patchforge.io import loading as pf
from tiny_pipelines import BUILDERS, cached_patches, run


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_kohya_round_trip(arch, tmp_path):
    patch = cached_patches(arch)[1]  # rank 3, alpha 2: alpha != rank
    out = tmp_path / "k.safetensors"
    assert cli.main(["export", str(patch), "--format", "kohya", "-o", str(out)]) == 0
    with safetensors.safe_open(str(out), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    te = ("lora_te1_", "lora_te2_") if arch == "sdxl" else ("lora_te_",)
    assert any(k.startswith("lora_unet_") for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in te)
    assert alphas == {2.0}
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "2.0"
    assert md["modelspec.prediction_type"] == ("v" if arch == "sd2" else "epsilon")
    assert md["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch]

    pipe = BUILDERS[arch]()
    pf.load_forget_patch(pipe, patch)
    ours = run(pipe)
    pf.unload_forget_patches(pipe)
    pipe.load_lora_weights(str(out))  # diffusers' own kohya import
    assert torch.allclose(run(pipe), ours, atol=1e-6)
