"""Push and pull through a fake Hub on 127.0.0.1 (real HTTP, huggingface_hub's own client), and
offline loads from a seeded cache. The process stays HF_HUB_OFFLINE=1; only these tests point the
client at the local server."""
import pytest
import torch
from huggingface_hub import constants

from fake_hub import seed_cache
from patchforge import cli
from patchforge.io import hub
from patchforge.io import loading as pf
from patchforge.errors import PatchforgeError
from tiny_pipelines import BUILDERS, cached_patches, run


def test_push_pull_load(fake_hub, tmp_path, capsys):
    patch = cached_patches("sd1")[0]
    assert cli.main(["push", str(patch), "me/forget-cat"]) == 0
    files = fake_hub.repos["me/forget-cat"]["files"]
    assert set(files) == {"pytorch_lora_weights.safetensors", "README.md"}
    assert files["pytorch_lora_weights.safetensors"] == patch.read_bytes()
    card = files["README.md"].decode()
    for line in ("library_name: diffusers", "base_model_relation: adapter", "- lora", "- concept-erasure",
                 "- patchforge", "concept 0", "| Method | test |"):
        assert line in card
    assert cli.main(["pull", "me/forget-cat"]) == 0
    assert "concept 0" in capsys.readouterr().out

    pipe = BUILDERS["sd1"]()
    pf.load_forget_patch(pipe, "me/forget-cat")
    from_hub = run(pipe)
    pf.unload_forget_patches(pipe)
    pf.load_forget_patch(pipe, patch)
    assert torch.equal(run(pipe), from_hub)

    with pytest.raises(PatchforgeError, match="no Hub repo 'me/missing'"):
        pf.load_forget_patch(pipe, "me/missing")
    with pytest.raises(PatchforgeError, match="no file 'x.safetensors'.*weight_name"):
        pf.load_forget_patch(pipe, "me/forget-cat", weight_name="x.safetensors")
    assert [p.concept for p in pf.list_forget_patches(pipe)] == ["concept 0"]


def test_offline_load_from_seeded_cache(monkeypatch, tmp_path):
    patch = cached_patches("sd1")[0]
    seed_cache(tmp_path, "someone/patch", {"pytorch_lora_weights.safetensors": patch.read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    pipe = BUILDERS["sd1"]()
    pf.load_forget_patch(pipe, "someone/patch")
    assert len(pf.list_forget_patches(pipe)) == 1
    with pytest.raises(PatchforgeError, match="not in the local Hub cache.*patchforge pull"):
        hub.resolve_patch_file("someone/other")


def test_model_card_eval_table():
    from patchforge.io.patch_format import read_patch
    p = read_patch(cached_patches("sd1")[0])
    p.metadata["patchforge.eval"] = ('{"efficacy": {"before": 0.9, "after": 0.05}, '
                                     '"fid": {"before": 10.0, "after": 11.5}}')
    card = hub.model_card(p, "me/x", image="before_after.png")
    assert "| efficacy | 0.9 | 0.05 |" in card and "![before and after](before_after.png)" in card
