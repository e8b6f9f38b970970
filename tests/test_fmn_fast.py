"""fmn's teacher pool: the frozen base's predictions made once for a pool of rows instead of every step."""
import pytest
import torch

from patchforge.train.loop import TrainConfig, train_patch
from tiny_pipelines import tiny_sd1

FAST = {"ref_steps": 2, "n_refs": 2}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def _train(pipe, out, **options):
    """(patch tensors, denoiser calls without gradients during training); the references are cached first."""
    from patchforge.io.patch_format import read_patch

    cfg = TrainConfig(steps=6, batch=2, progress=False, lr=1e-2, options={**FAST, **options})
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        path, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=out, pipe=pipe)
    finally:
        hook.remove()
    return read_patch(path).state_dicts["unet"], calls.count(False)


def test_a_teacher_pool_calls_the_base_once_per_pooled_row_and_still_trains(tmp_path):
    pipe = tiny_sd1()
    _train(pipe, tmp_path / "warm.safetensors")  # references cached: later runs call the base for teachers only
    fresh, fresh_calls = _train(pipe, tmp_path / "a.safetensors", teacher_pool=0)
    pooled, pooled_calls = _train(pipe, tmp_path / "b.safetensors", teacher_pool=2)
    # per draw: one call for the anchor and preserve teachers, one for the concept (the away term)
    assert fresh_calls == 6 * 2 and pooled_calls == 2 * 2
    assert fresh.keys() == pooled.keys()
    assert any(not torch.equal(fresh[k], pooled[k]) for k in fresh)  # other rows, another patch
    assert all(pooled[k].abs().max() > 0 for k in pooled if "lora_B" in k)  # and it trained
    again, _ = _train(pipe, tmp_path / "c.safetensors", teacher_pool=2)
    assert all(torch.equal(again[k], pooled[k]) for k in pooled)  # deterministic
    _, capped_calls = _train(pipe, tmp_path / "d.safetensors", teacher_pool=50)
    assert capped_calls == 6 * 2  # a pool larger than the run is cut to one batch per step


def test_a_teacher_pool_trains_a_text_encoder_lora_too(tmp_path):
    """Pooled rows are reused across steps: the preserve rows' embeddings are made every step, through the
    text-encoder LoRA as it is then (a pooled embedding would backward through a freed, since-updated graph)."""
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd1()
    cfg = TrainConfig(steps=4, batch=2, progress=False, lr=1e-2, text_encoder=True,
                      options={**FAST, "teacher_pool": 2})
    path, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / "te.safetensors", pipe=pipe)
    text = read_patch(path).state_dicts["text_encoder"]
    assert text and all(text[k].abs().max() > 0 for k in text if "lora_B" in k)  # the text encoder trained
