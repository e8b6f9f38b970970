"""The shared loop on tiny random pipelines: CLI, metadata, determinism, loading, judge isolation."""
import json
import subprocess
import sys

import pytest
import torch

from patchforge.train.loop import TrainConfig, train_patch
from tiny_pipelines import run, tiny_sd1

FAST = {"ref_steps": 2, "n_refs": 2}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_train_writes_a_loadable_deterministic_patch(tmp_path):
    from patchforge.io.loading import load_forget_patch
    from patchforge.io.patch_format import read_patch

    pipe = tiny_sd1()
    cfg = TrainConfig(steps=3, batch=2, progress=False, options=FAST, lr=1e-2)
    p1, s = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / "a.safetensors", pipe=pipe)
    p2, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / "b.safetensors", pipe=pipe)
    a, b = read_patch(p1), read_patch(p2)
    assert a.state_dicts.keys() == b.state_dicts.keys()
    for comp in a.state_dicts:
        for k, v in a.state_dicts[comp].items():
            assert torch.equal(v, b.state_dicts[comp][k]), k  # same seed, same patch
    md = a.metadata
    assert md["patchforge.method"] == "fmn" and json.loads(md["patchforge.concepts"])[0]["kind"] == "custom"
    assert json.loads(md["patchforge.hyperparameters"])["rank"] == 4 and md["patchforge.seed"] == "0"
    assert float(md["patchforge.training_seconds"]) > 0 and md["patchforge.device"] == "cpu"
    assert s["steps"] == 3 and s["bytes"] < 2_000_000
    assert not getattr(pipe.unet, "peft_config", None) or "forget" not in pipe.unet.peft_config  # pipe left clean
    before = run(pipe)
    load_forget_patch(pipe, p1)
    assert not torch.allclose(before, run(pipe))


def test_cli_train_on_a_model_folder(tmp_path, capsys):
    from patchforge.cli import main

    folder = tmp_path / "tiny"
    tiny_sd1().save_pretrained(folder)
    out = tmp_path / "p.safetensors"
    capsys.readouterr()
    rc = main(["train", "--concept", "custom:a cat", "--concept", "custom:a dog", "--model", str(folder),
               "--steps", "2", "--batch", "2", "--set", "ref_steps=2", "--set", "n_refs=2", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0 and out.exists()
    printed = capsys.readouterr()
    assert "plan:" in printed.out and "2 steps" in printed.out  # the plan line and the summary
    assert "it/s" not in printed.err and "s/it" not in printed.err  # no progress bar off a terminal
    assert main(["train", "--concept", "style:strips", "--model", str(folder)]) == 2
    assert main(["train", "--concept", "custom:x", "--method", "nope"]) == 2
    capsys.readouterr()
    assert main(["train", "--concept", "custom:x", "--set", "contrats=0.5"]) == 2  # a typo is not silently dropped
    assert "did you mean contrast?" in capsys.readouterr().err


def test_training_code_never_imports_a_judge():
    code = ("import sys; import patchforge.train.loop, patchforge.core.concepts;"
            "from patchforge.methods import get_method;"
            "[get_method(m) for m in ('fmn','sa','aob','redact','esd')];"
            "bad=[m for m in sys.modules if m.startswith(('patchforge.toyworld.judges','patchforge.eval.evaluation',"
            "'patchforge.eval.judging'))];"
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.slow
def test_accelerate_launch_deals_a_concept_list_out_one_patch_per_process(tmp_path):
    """`accelerate launch` (which sets RANK / WORLD_SIZE like torchrun) with two processes: each trains
    its own share of the concept file, no patch twice, every patch once. `--multi_gpu` launches two
    processes on a CPU machine too (each then trains on the CPU)."""
    import os
    import shutil

    from safetensors import safe_open

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this Python")
    folder = tmp_path / "tiny"
    tiny_sd1().save_pretrained(folder)
    concepts = tmp_path / "c.yaml"
    concepts.write_text("".join(f'- target: "{w}"\n  kind: custom\n' for w in ("a cat", "a dog", "a red barn")))
    env = {**os.environ, "PATCHFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "patchforge.cli", "train",
           "--concept-file", str(concepts), "--model", str(folder), "--steps", "2", "--batch", "2",
           "--set", "ref_steps=2", "--set", "n_refs=2", "--quiet", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "trained" in line]
    assert sorted(line.split("]")[0] for line in lines) == ["[process 1/2", "[process 1/2", "[process 2/2"]
    patches = sorted((tmp_path / "patches").glob("*.safetensors"))
    assert [p.name for p in patches] == ["custom-a-cat.fmn.safetensors", "custom-a-dog.fmn.safetensors",
                                         "custom-a-red-barn.fmn.safetensors"]
    for p in patches:
        with safe_open(str(p), "pt") as f:
            assert f.metadata()["patchforge.device"] == "cpu"


def test_user_images_replace_the_base_models_references(tmp_path, capsys):
    """--images FOLDER: methods train on the user's images (any size, centre-cropped), not on the base
    model's generations; the patch says so; a wrong folder or an unreadable file fails in one line."""
    import numpy as np
    from PIL import Image

    from patchforge.cli import main
    from patchforge.core.concepts import merge, resolve
    from patchforge.errors import PatchforgeError
    from patchforge.methods import get_method
    from patchforge.io.patch_format import read_patch
    from patchforge.train.loop import Trainer

    folder = tmp_path / "cats"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24), (64, 64), (20, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    pipe = tiny_sd1()
    cfg = TrainConfig(steps=2, batch=2, progress=False, options=FAST, images=str(folder))
    specs = [resolve("custom:a photo of a cat")]
    method = get_method("fmn")
    runner = method(method.Config(), Trainer(pipe, cfg, torch.device("cpu")), specs, merge(specs))
    refs = runner.concept_refs()
    size = pipe.unet.config.sample_size
    assert refs.shape == (3, pipe.unet.config.in_channels, size, size)  # one latent per image
    path, _ = train_patch(specs, "fmn", None, cfg, out=tmp_path / "p.safetensors", pipe=pipe)
    assert json.loads(read_patch(path).metadata["patchforge.hyperparameters"])["reference_images"] == "user"

    assert main(["train", "--concept", "custom:a cat", "--images", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PatchforgeError, match="cannot read broken.png"):
        Trainer(pipe, cfg, torch.device("cpu")).encode_images(folder)
