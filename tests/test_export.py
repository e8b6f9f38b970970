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


def test_published_files_change_what_fuse_changes_by_each_tools_rule(fake_hub):
    """What push uploads, read by the rules the tools document (no checkouts needed):
    - kohya sd-scripts (merge_lora) and AUTOMATIC1111: kohya keys `lora_unet_<module, . -> _>`,
      `lora_te_text_model_...`, delta = up @ down * alpha / dim (alpha from `.alpha`, else dim);
    - ComfyUI: the kohya keys the same way, and diffusers/PEFT keys at alpha / r with alpha from `.alpha`
      tensors only, else scale 1 (it never reads lora_adapter_metadata);
    - diffusers: the PEFT file with its lora_adapter_metadata.
    Every module's change equals fuse_forget_patches' within 1e-6, alpha != rank and a text encoder included,
    and no tool's file leaves a module out."""
    import safetensors.torch

    from patchforge.io import hub
    from tiny_pipelines import tiny_sd1

    patch = cached_patches("sd1")[1]  # rank 3, alpha 2: alpha != rank; UNet and text encoder
    hub.push_patch(patch, "me/rules")
    files = fake_hub.repos["me/rules"]["files"]
    kohya = safetensors.torch.load(files["forget_patch.kohya.safetensors"])
    peft = safetensors.torch.load(files["pytorch_lora_weights.safetensors"])
    pipe = tiny_sd1()
    names = {**{"lora_unet_" + n.replace(".", "_"): ("unet", n) for n, m in pipe.unet.named_modules()
                if isinstance(m, torch.nn.Linear)},
             **{"lora_te_text_model_" + n.replace(".", "_"): ("text_encoder", n)
                for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)}}
    before = {v: getattr(pipe, v[0]).get_submodule(v[1]).weight.detach().clone() for v in names.values()}
    pf.load_forget_patch(pipe, patch)
    pf.fuse_forget_patches(pipe)
    fused = {v: getattr(pipe, v[0]).get_submodule(v[1]).weight.detach() - w for v, w in before.items()}
    changed = {v for v, d in fused.items() if d.abs().max() > 0}

    kohya_deltas = {}
    for key in (k for k in kohya if k.endswith(".lora_down.weight")):
        stem = key.removesuffix(".lora_down.weight")
        down, up = kohya[key], kohya[f"{stem}.lora_up.weight"]
        alpha = float(kohya.get(f"{stem}.alpha", torch.tensor(down.shape[0])))
        kohya_deltas[names[stem]] = up @ down * (alpha / down.shape[0])
    comfy_peft = {}
    for key in (k for k in peft if k.endswith(".lora_A.weight")):
        comp, _, module = key.removesuffix(".lora_A.weight").partition(".")
        module = module.removeprefix("text_model.") if comp == "text_encoder" else module
        comfy_peft[(comp, module)] = peft[key.replace("lora_A", "lora_B")].float() @ peft[key].float()  # scale 1
    for rule, deltas in (("kohya / A1111", kohya_deltas), ("ComfyUI on the PEFT file", comfy_peft)):
        assert set(deltas) == changed, rule
        for v, d in deltas.items():
            assert torch.allclose(d, fused[v], atol=1e-6), (rule, v)
    assert any(v[0] == "text_encoder" for v in changed)

    plain = tiny_sd1()
    plain.load_lora_weights("me/rules", weight_name="pytorch_lora_weights.safetensors")
    assert torch.allclose(run(plain), run(pipe), atol=1e-5)
