"""One suite every model family passes: each registered backbone (patchforge/backbones/) must serve a tiny
pipeline of its family here, and on each of them the seam does what the rest of patchforge relies on. A new
family file is tested by this suite once tests/tiny_pipelines.py can build a pipeline of it (the first test
fails until then)."""
import re

import numpy as np
import pytest
import torch

from patchforge.backbones import FAMILIES, Cond, FamilyDefaults, backbone_for_folder, for_pipe
from tiny_pipelines import BUILDERS


def test_every_registered_family_has_a_tiny_pipeline():
    served = {type(for_pipe(build())) for build in BUILDERS.values()}
    missing = [cls.__name__ for cls in FAMILIES if cls not in served]
    assert not missing, f"no tiny pipeline in tests/tiny_pipelines.py for {missing}: the shared suite skips them"


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_the_seam_on_every_family(arch, tmp_path):
    pipe = BUILDERS[arch]()
    backbone = for_pipe(pipe)
    cls = type(backbone)
    assert cls.matches(pipe) and backbone.denoiser is getattr(pipe, backbone.denoiser_name)
    assert backbone.components[0] == backbone.denoiser_name
    assert isinstance(backbone.family_name(), str) and backbone.family_name()
    assert all(isinstance(d, FamilyDefaults) for d in getattr(cls, "RELEASES", {}).values())

    # prompts -> Cond; images -> latents; the forward process; the denoiser call: shapes line up
    cond = backbone.encode(["a photo of a cat", "a dog"], pipe.device)
    assert isinstance(cond, Cond) and len(cond) == 2
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x0 = backbone.encode_images(images)
    x_t, t, noise = backbone.noised(x0, torch.Generator("cpu").manual_seed(0))
    assert x_t.shape == x0.shape == noise.shape and len(t) == 2
    assert backbone.training_target(x0, noise, t).shape == x0.shape
    with torch.no_grad():
        assert backbone.predict(x_t, t, cond).shape == x0.shape
        assert backbone.decode(x0).shape[0] == 2

    # where the image reads the text: what FMN records and uce/the keep term edit
    assert backbone.text_attention() and backbone.text_kv()
    pattern = backbone.target_pattern("xattn-kv")  # a regex string: PEFT full-matches it against module names
    assert any(re.fullmatch(pattern, n) for n, _ in backbone.denoiser.named_modules())
    from patchforge.train.loop import TARGET_SETS
    assert set(cls.TARGETS) == set(TARGET_SETS)  # --targets' named sets mean something on every family
    # the layers that read the pooled prompt embedding are plain linear layers of the denoiser, and the
    # "xattn-kv+pooled" targets are exactly the K/V plus them
    pooled = backbone.pooled_text_in()
    assert all(isinstance(m, torch.nn.Linear) for _, m in pooled)
    both = backbone.target_pattern("xattn-kv+pooled")
    assert {n for n, _ in backbone.denoiser.named_modules() if re.fullmatch(both, n)} == \
        {n for n, _ in backbone.denoiser.named_modules() if re.fullmatch(pattern, n)} | {n for n, _ in pooled}
    assert bool(pooled) == (backbone.denoiser_name == "transformer")  # SD3 and FLUX have one; SD 1.x / 2.x / XL none
    # "text-in": the layers that read the text encoders' output itself. A UNet's K/V do; a transformer's K/V read
    # its own text stream, which the tokens enter through token_text_in()
    tokens_in = backbone.token_text_in()
    assert all(isinstance(m, torch.nn.Linear) for _, m in tokens_in)
    readers = backbone.target_pattern("text-in")
    expected = ({n for n, _ in tokens_in} | {n for n, _ in pooled} if tokens_in else
                {n for n, _ in backbone.denoiser.named_modules() if re.fullmatch(pattern, n)})
    assert {n for n, _ in backbone.denoiser.named_modules() if re.fullmatch(readers, n)} == expected
    assert bool(tokens_in) == (not backbone.text_kv_reads_text)

    # the memory plan's count, and the same family read back from a saved folder without loading it
    side = backbone.native_size() // getattr(pipe, "vae_scale_factor", 8)
    assert cls.feature_values(dict(backbone.denoiser.config), side) > 0
    pipe.save_pretrained(tmp_path / "p")
    found = backbone_for_folder(tmp_path / "p")
    assert found is not None and found[0] is cls and found[1] == backbone.family_name()
