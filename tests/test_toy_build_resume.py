"""`toy train --resume`: an interrupted build continued from its last checkpoint ends with exactly the
model an uninterrupted build makes (tiny configuration, a few steps)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchforge.errors import PatchforgeError
from patchforge.toyworld import build

TINY = dict(dataset_size=48, vae_steps=2, unet_steps=6, judge_steps=1, batch_size=4, checkpoint_every=2, threads=1)


class Stop(Exception):
    pass


def _weights(out: Path) -> dict:
    files = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    return {f"{c}/{k}": v for c, name in files.items()
            for k, v in load_file(str(out / "pipeline" / c / f"{name}.safetensors")).items()}


@pytest.mark.parametrize("world", ["v2"])  # v1 takes the same code path (and resumed bit-exactly when tried)
def test_interrupted_build_resumes_bit_exactly(tmp_path, monkeypatch, world):
    monkeypatch.setattr(build, "build_judges", lambda out, vae, cfg: (0.0, {}, {}))  # not what is tested here
    torch.manual_seed(123)  # the build seeds itself: what runs before it must not matter
    cfg = build.ToyBuildConfig(**TINY, world=world)
    build.build_toy_model(tmp_path / "whole", cfg)

    def stop_after_first(step):
        if step == 2:
            raise Stop
    with pytest.raises(Stop):
        build.build_toy_model(tmp_path / "cut", cfg, on_checkpoint=stop_after_first)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "pipeline").exists()
    torch.manual_seed(999)
    report = build.build_toy_model(tmp_path / "cut", cfg, resume=True)
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not (tmp_path / "cut" / "checkpoints").exists()  # done: nothing left to resume
    whole_report = json.loads((tmp_path / "whole" / "build_report.json").read_text())
    assert report["unet_final_loss"] == whole_report["unet_final_loss"]


def test_resume_after_the_unet_stage_goes_straight_to_the_judges(tmp_path, monkeypatch):
    judged = []
    monkeypatch.setattr(build, "build_judges", lambda out, vae, cfg: judged.append(1) or (0.0, {}, {}))

    def stop_at_end(step):
        if step == TINY["unet_steps"]:
            raise Stop
    cfg = build.ToyBuildConfig(**TINY)
    with pytest.raises(Stop):
        build.build_toy_model(tmp_path, cfg, on_checkpoint=stop_at_end)
    seen = []
    build.build_toy_model(tmp_path, cfg, resume=True, on_checkpoint=seen.append)
    assert seen == [] and judged == [1]  # no UNet step was redone


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "build_judges", lambda out, vae, cfg: (0.0, {}, {}))

    def stop(step):
        raise Stop
    cfg = build.ToyBuildConfig(**TINY)
    with pytest.raises(Stop):
        build.build_toy_model(tmp_path, cfg, on_checkpoint=stop)
    with pytest.raises(PatchforgeError, match="other settings"):
        build.build_toy_model(tmp_path, build.ToyBuildConfig(**{**TINY, "unet_steps": 8}), resume=True)
    with pytest.raises(PatchforgeError, match="unknown toy world"):
        build.build_toy_model(tmp_path, build.ToyBuildConfig(**{**TINY, "world": "v9"}))


def test_a_v2_build_takes_v2s_defaults_and_needs_an_out_folder(tmp_path, monkeypatch, capsys):
    from patchforge.cli import main

    seen = []
    monkeypatch.setattr(build, "build_toy_model", lambda out, cfg, resume=False: seen.append(cfg) or
                        {"judge_accuracy_real": {}, "total_s": 0})
    assert main(["toy", "train", "--world", "v2"]) != 0  # would overwrite the shipped v1 model
    assert "--out" in capsys.readouterr().err and not seen
    assert main(["toy", "train", "--world", "v2", "--out", str(tmp_path)]) == 0
    assert seen[-1].world == "v2" and seen[-1].unet_steps == build.WORLD_DEFAULTS["v2"]["unet_steps"] != 8500
    assert main(["toy", "train", "--world", "v2", "--out", str(tmp_path), "--unet-steps", "7"]) == 0
    assert seen[-1].unet_steps == 7  # a flag wins
    assert main(["toy", "train", "--out", str(tmp_path)]) == 0 and seen[-1].unet_steps == 8500  # v1 unchanged
