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
    assert set(files) == {"pytorch_lora_weights.safetensors", "forget_patch.kohya.safetensors", "README.md"}
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
    assert torch.allclose(run(pipe), from_hub, atol=1e-6)  # the published file: scales folded into B, alpha = r

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


def test_card_round_trips_with_license_tags_picture_and_numbers(fake_hub, tmp_path):
    import json
    import shutil

    from huggingface_hub import ModelCard

    patch = tmp_path / "p.safetensors"
    shutil.copy(cached_patches("sd1")[0], patch)
    (tmp_path / "p.eval.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "p.eval.json").write_text(json.dumps({
        "settings": {"date": "2026-12-06", "model": "patchforge/toy-sd", "judge": "toy-judge", "seeds": 8},
        "metrics": {"efficacy": {"base": 1.0, "patched": 0.0, "ci_patched": [0.0, 0.05]}}}))
    hub.push_patch(patch, "me/carded")
    files = fake_hub.repos["me/carded"]["files"]
    assert "before_after.png" in files
    card = ModelCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["license"] == "creativeml-openrail-m"  # the SD 1.x base's license
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion-diffusers"} <= set(data["tags"])
    assert "![before and after](before_after.png)" in card.text
    assert "2026-12-06" in card.text and "| 100 % | 0 % | [0 %, 5 %] |" in card.text
    assert "models/loras" in card.text and "<lora:forget_patch.kohya:1>" in card.text


@pytest.mark.parametrize("family, license_id", [("sd1.x", "creativeml-openrail-m"), ("sdxl", "openrail++"),
                                                ("flux.1-schnell", "apache-2.0"), ("flux.1-dev", "other"),
                                                ("toy", "other")])
def test_card_license_follows_the_base_family(family, license_id):
    from huggingface_hub import ModelCard

    from patchforge.io.patch_format import read_patch

    p = read_patch(cached_patches("sd1")[0])
    p.metadata["patchforge.base_family"] = family
    data = ModelCard(hub.model_card(p, "me/x")).data.to_dict()
    assert data["license"] == license_id and (license_id != "other" or data["license_link"].startswith("https://"))
    assert ("template:sd-lora" in data["tags"]) == family.startswith("flux")


def test_a_failed_push_leaves_no_empty_repo_behind(fake_hub, capsys):
    """A push whose commit fails removes the repo it created (one line, exit 2), and never a repo that
    existed before it."""
    patch = cached_patches("sd1")[0]
    fake_hub.fail_commits = True
    assert cli.main(["push", str(patch), "me/new-repo"]) == 2
    assert "push to 'me/new-repo' failed" in capsys.readouterr().err
    assert "me/new-repo" not in fake_hub.repos and "DELETE /api/repos/delete" in fake_hub.requests

    fake_hub.fail_commits = False
    assert cli.main(["push", str(patch), "me/kept"]) == 0
    before = dict(fake_hub.repos["me/kept"]["files"])
    fake_hub.fail_commits = True
    assert cli.main(["push", str(patch), "me/kept"]) == 2
    assert fake_hub.repos["me/kept"]["files"] == before  # an existing repo is never deleted
