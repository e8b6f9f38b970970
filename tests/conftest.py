import os

# Tests never touch the network; huggingface_hub reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """tests/fake_hub.py's server on 127.0.0.1, with huggingface_hub pointed at it (and a fresh cache)
    for this one test; the process stays HF_HUB_OFFLINE=1 otherwise."""
    from huggingface_hub import constants

    from fake_hub import FakeHub

    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        yield server


@pytest.fixture(scope="session")
def toy_v2_model(tmp_path_factory):
    """A tiny world-v2 toy model, built once per session: `OUT/pipeline` and `OUT/judges.safetensors`, as
    `patchforge toy train --world v2 --out OUT` writes them. A few steps of each stage: its images and
    judges mean nothing, it is for plumbing (what claims the folder, which prompts reach training and eval)."""
    import torch

    from patchforge.toyworld import build

    out = tmp_path_factory.mktemp("toy_v2") / "toy-v2"
    cfg = build.ToyBuildConfig(world="v2", dataset_size=48, vae_steps=2, unet_steps=2, judge_steps=1, batch_size=4,
                               checkpoint_every=0, threads=1)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "judge_accuracy", lambda judge: {})  # 2 000 renders for the build report: not needed
        build.build_toy_model(out, cfg, log=lambda *a: None)
    torch.set_num_threads(threads)  # the build sets it for the whole process
    return out
