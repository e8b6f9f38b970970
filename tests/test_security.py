"""A patch from a stranger must not harm the pipeline, and stacking fails closed.

Every case here was once a working attack or a traceback: a LoRA config that rewrites the base
weights, a lying rank, NaN scales, a user LoRA that silently switches patches off, a fingerprint
fooled by negating half the weights, path traversal through `revision`, model-card injection, a
fuse/unfuse drift. Each must give a one-line error (or work as documented) and leave the pipeline
bit for bit as it was, fingerprint included. The same cases seed the fuzz test in test_fuzz.py."""
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from huggingface_hub import constants

from patchforge import cli
from patchforge.io import hub
from patchforge.io import loading as pf
from patchforge.io import fingerprint
from patchforge.io import patch_format as fmt
from patchforge.errors import BaseModelMismatch, PatchforgeError, PatchFormatError
from patchforge.io.loading import PatchesSwitchedWarning
from tiny_pipelines import cached_patches, run, tiny_sd1


# ----------------------------------------------------------------------------- helpers (also used by test_fuzz)

def pipeline_state(pipe) -> tuple:
    """Everything 'bit for bit' means: module tree, every parameter and buffer's bytes, fingerprint."""
    h = hashlib.sha256()
    for comp in ("unet", "text_encoder", "vae"):
        model = getattr(pipe, comp)
        for name, module in model.named_modules():
            h.update(f"{name}:{type(module).__name__};".encode())
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), tuple(sorted(fingerprint.base_fingerprint(pipe).items()))


def forge(folder, name, lora=None, meta=None, tensors=None, good=None):
    """A copy of a good sd1 patch with its LoRA config, metadata or tensors changed by hand (written
    with safetensors directly, so nothing of patchforge's writer cleans it)."""
    good = good or cached_patches("sd1")[0]
    sd = safetensors.torch.load_file(str(good))
    with safetensors.safe_open(str(good), "pt") as f:
        md = dict(f.metadata())
    lora_md = json.loads(md["lora_adapter_metadata"])
    for key, value in (lora or {}).items():
        lora_md[key if "." in key else f"unet.{key}"] = value
    md["lora_adapter_metadata"] = json.dumps(lora_md)
    for key, value in (meta or {}).items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    if tensors:
        sd = tensors(sd)
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata=md)
    return path


def _scale_b(factor):
    return lambda sd: {k: v * factor if "lora_B" in k else v for k, v in sd.items()}


def _to_float8(sd):
    return {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}


NAN, INF = float("nan"), float("inf")
# name -> (forge arguments, must it be refused?)
REPRODUCTIONS = {
    # 1: a config that rewrites the base, or wraps / reshapes it
    "init-pissa": ({"lora": {"init_lora_weights": "pissa"}}, True),
    "init-olora": ({"lora": {"init_lora_weights": "olora"}}, True),
    "init-corda": ({"lora": {"init_lora_weights": "corda"}}, True),
    "init-loftq": ({"lora": {"init_lora_weights": "loftq"}}, True),
    "layers-to-transform": ({"lora": {"layers_to_transform": [0]}}, True),
    "exclude-modules": ({"lora": {"exclude_modules": ["to_q"]}}, True),
    "dora": ({"lora": {"use_dora": True}}, True),
    "lora-bias": ({"lora": {"lora_bias": True}}, True),
    "bias-all": ({"lora": {"bias": "all"}}, True),
    "layer-replication": ({"lora": {"layer_replication": [[0, 1]]}}, True),
    "unknown-option": ({"lora": {"future_option": {"x": 1}}}, True),
    # 2: wraps a base module
    "modules-to-save": ({"lora": {"modules_to_save": ["conv_in"]}}, True),
    # 4: NaN / inf / huge scales and weights
    "alpha-nan": ({"lora": {"lora_alpha": NAN}}, True),
    "alpha-inf": ({"lora": {"lora_alpha": INF}}, True),
    "alpha-1e38": ({"lora": {"lora_alpha": 1e38}}, True),
    "alpha-pattern-nan": ({"lora": {"alpha_pattern": {"to_q": NAN}}}, True),
    "huge-AB": ({"tensors": _scale_b(1e6)}, True),
    "big-AB": ({"tensors": _scale_b(300.0)}, True),  # finite and under the absolute cap, 10x over the layer
    # regex pattern keys: PEFT applies them to every module they match (to_[kv] -> 250 000x in diffusers)
    "alpha-pattern-class": ({"lora": {"alpha_pattern": {"to_[kv]": 1e6}}}, True),
    "alpha-pattern-dotstar": ({"lora": {"alpha_pattern": {".*": 1e6}}}, True),
    "alpha-pattern-alternation": ({"lora": {"alpha_pattern": {"to_k|to_v": 1e6}}}, True),
    "rank-pattern-class": ({"lora": {"rank_pattern": {"to_[kv]": 8}}}, True),
    # a patch that does nothing (alpha 0) or the inverse of itself (alpha < 0)
    "alpha-zero": ({"lora": {"lora_alpha": 0}}, True),
    "alpha-negative": ({"lora": {"lora_alpha": -2.0}}, True),
    # 5: a lying rank
    "rank-1e6": ({"lora": {"r": 1_000_000}}, True),
    "rank-pattern-lie": ({"lora": {"rank_pattern": {"to_q": 64}}}, True),
    # 8: configs merge/export used to trip over
    "rank-0": ({"lora": {"r": 0}}, True),
    "rank-string": ({"lora": {"r": "4"}}, True),
    "rank-bool": ({"lora": {"r": True}}, True),
    "alpha-string": ({"lora": {"lora_alpha": "2"}}, True),
    "float8": ({"tensors": _to_float8}, True),
    "config-not-a-dict": ({"meta": {"lora_adapter_metadata": "[1, 2]"}}, True),
    # 11: no architecture recorded
    "arch-empty": ({"meta": {"patchforge.base_architecture": ""}}, True),
    "arch-missing": ({"meta": {"patchforge.base_architecture": None}}, True),
    # harmless oddities that must simply load
    "init-gaussian": ({"lora": {"init_lora_weights": "gaussian"}}, False),
    "regex-targets": ({"lora": {"target_modules": "(a+)+$"}}, False),
    "dropout": ({"lora": {"lora_dropout": 0.5}}, False),
    "newline-metadata": ({"meta": {"patchforge.concept": "cat\n\x1b[31mred", "patchforge.base_repo_id": "x\ny"}},
                         False),
}


def check_one_line(err):
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, msg


# ----------------------------------------------------------------------------- 1, 2, 4, 5, 8, 11: forged files

@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1()


@pytest.mark.parametrize("case", sorted(REPRODUCTIONS))
def test_reproductions_fail_closed(case, pipe, tmp_path):
    args, refused = REPRODUCTIONS[case]
    path = forge(tmp_path, case, **args)
    before, out = pipeline_state(pipe), run(pipe)
    t0 = time.perf_counter()
    if refused:
        with pytest.raises(PatchforgeError) as err:
            pf.load_forget_patch(pipe, path)
        check_one_line(err.value)
    else:
        pf.load_forget_patch(pipe, path)
        pf.unload_forget_patches(pipe)
    assert time.perf_counter() - t0 < 10  # a lying rank used to allocate for minutes
    assert pipeline_state(pipe) == before and torch.equal(run(pipe), out)
    assert pf.list_forget_patches(pipe) == [] and pipe.get_list_adapters() == {}


@pytest.mark.parametrize("path", ["module by module", "diffusers' loaders"])
def test_after_a_failed_load_valid_patches_still_load(pipe, tmp_path, monkeypatch, path):
    """The rollback restores the module tree, not just the adapter names: a failure deep inside the
    load (here: the text-encoder half, after the UNet half went in; in patchforge's own module-by-module
    injection once the text encoder's layers are built, or in diffusers' loaders) leaves nothing."""
    from patchforge.io import adapter_inject

    good = cached_patches("sd1")[0]
    before = pipeline_state(pipe)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    if path == "module by module":
        real = adapter_inject.inject

        def inject(model, *args, **kwargs):
            real(model, *args, **kwargs)
            if model is pipe.text_encoder:
                broken()
        monkeypatch.setattr(adapter_inject, "inject", inject)
    else:
        monkeypatch.setattr(adapter_inject, "available", lambda models: False)
        pipe.load_lora_into_text_encoder = broken
    try:
        with pytest.raises(PatchFormatError, match="disk on fire") as err:
            pf.load_forget_patch(pipe, good)
    finally:
        pipe.__dict__.pop("load_lora_into_text_encoder", None)
        monkeypatch.undo()
    check_one_line(err.value)
    assert pipeline_state(pipe) == before
    name = pf.load_forget_patch(pipe, good, strict=True)  # the fingerprint still matches
    pf.unload_forget_patch(pipe, name)
    assert pipeline_state(pipe) == before


def test_a_failed_load_leaves_a_stack_as_it_was(monkeypatch):
    """With a patch and a user's LoRA already in every layer the failing load touches, the rollback
    puts the layers' adapter containers, scales and active sets back: the same tree, tensors, active
    adapters and output, and the next load works."""
    from patchforge.io import adapter_inject

    pipe = tiny_sd1()
    first, user, third = cached_patches("sd1")
    name = pf.load_forget_patch(pipe, first, weight=0.7)
    pipe.load_lora_weights(str(user), adapter_name="mine")
    pf.list_forget_patches(pipe)  # the guard's repair: both active
    before, out, active = pipeline_state(pipe), run(pipe), sorted(pipe.get_active_adapters())
    real = adapter_inject.inject

    def inject(model, *args, **kwargs):
        real(model, *args, **kwargs)
        if model is pipe.text_encoder:
            raise RuntimeError("disk on fire")
    monkeypatch.setattr(adapter_inject, "inject", inject)
    with pytest.raises(PatchFormatError, match="disk on fire"):
        pf.load_forget_patch(pipe, third)
    monkeypatch.undo()
    assert pipeline_state(pipe) == before and sorted(pipe.get_active_adapters()) == active
    assert torch.equal(run(pipe), out)
    assert [(p.adapter_name, p.weight) for p in pf.list_forget_patches(pipe)] == [(name, pytest.approx(0.7))]
    pf.load_forget_patch(pipe, third)
    assert len(pf.list_forget_patches(pipe)) == 2 and "mine" in pipe.get_active_adapters()


@pytest.mark.parametrize("path", ["module by module", "diffusers' loaders"])
def test_a_wrapper_slipped_past_the_allow_list_is_undone(pipe, monkeypatch, path):
    """Defence in depth: if a config option that wraps base modules ever got past the allow-list, the
    module-by-module injection refuses it before building a layer; through diffusers' loaders it
    reaches PEFT and the load is undone (base parameters renamed -> rollback). Later patches still load."""
    from patchforge.io import adapter_inject

    if path != "module by module":
        monkeypatch.setattr(adapter_inject, "available", lambda models: False)
    good = cached_patches("sd1")[0]
    before = pipeline_state(pipe)
    real = pf.peft_config_kwargs
    monkeypatch.setattr(pf, "peft_config_kwargs", lambda *a: {**real(*a), "modules_to_save": ["conv_in"]})
    with pytest.raises(PatchforgeError) as err:
        pf.load_forget_patch(pipe, good)
    check_one_line(err.value)
    assert pipeline_state(pipe) == before
    monkeypatch.setattr(pf, "peft_config_kwargs", real)
    name = pf.load_forget_patch(pipe, good, strict=True)
    pf.unload_forget_patch(pipe, name)
    assert pipeline_state(pipe) == before


def test_bad_weights_refused_before_anything_loads(pipe, tmp_path):
    good = cached_patches("sd1")[0]
    before = pipeline_state(pipe)
    for weight in (NAN, INF, -INF, 1e38, "1"):
        with pytest.raises(PatchforgeError, match="finite number"):
            pf.load_forget_patch(pipe, good, weight=weight)
    name = pf.load_forget_patch(pipe, good)
    with pytest.raises(PatchforgeError, match="finite number"):
        pf.set_forget_patch_weight(pipe, name, NAN)
    pf.unload_forget_patches(pipe)
    with pytest.raises(PatchforgeError, match="not allowed"):
        pf.load_forget_patch(pipe, good, adapter_name="a.b")
    assert pipeline_state(pipe) == before


def test_generate_refuses_nan_before_loading_a_model(tmp_path, capsys):
    out, nope = tmp_path / "x.png", str(tmp_path / "nope")
    for args in (["--weight", "nan", "--patch", "p"], ["--guidance", "nan"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_:  # refused while parsing: no model is loaded
            cli.main(["generate", "a cat", "-o", str(out), "--model", nope, *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "finite" in err or "at least 1" in err, err
    assert cli.main(["generate", "a cat", "-o", str(out), "--model", nope, "--patch", "p", "--weight", "1",
                     "--weight", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 --weight values" in err and err.count("\n") == 1, err  # checked before the (missing) model
    assert not out.exists()


# ----------------------------------------------------------------------------- 3: stacking fails closed

def test_user_lora_never_silently_switches_a_patch_off():
    pipe = tiny_sd1()
    patch, user = cached_patches("sd1")[0], cached_patches("sd1")[1]
    name = pf.load_forget_patch(pipe, patch)

    pipe.load_lora_weights(str(user), adapter_name="mine")  # diffusers now has only "mine" active
    with pytest.warns(PatchesSwitchedWarning, match=name):
        both = run(pipe)  # the guard switched the patch back on before the forward pass
    assert sorted(pipe.get_active_adapters()) == sorted([name, "mine"])
    pipe.set_adapters([name, "mine"], [1.0, 1.0])
    assert torch.allclose(run(pipe), both, atol=1e-5)  # another summation order: float error only (1.6e-6 seen)

    pipe.set_adapters(["mine"])  # the documented diffusers way to pick adapters
    with pytest.warns(PatchesSwitchedWarning):
        listed = pf.list_forget_patches(pipe)
    assert [(p.adapter_name, p.weight, p.active) for p in listed] == [(name, 1.0, True)]
    assert torch.allclose(run(pipe), both, atol=1e-6)

    pipe.set_adapters([name, "mine"], [0.4, 1.0])  # a weight set through diffusers is what the listing shows
    assert pf.list_forget_patches(pipe)[0].weight == pytest.approx(0.4)

    pipe.disable_lora()
    with pytest.warns(PatchesSwitchedWarning):
        run(pipe)
    assert name in pipe.get_active_adapters()

    pipe.delete_adapters(name)  # removed through diffusers: the listing follows the pipeline, loudly
    with pytest.warns(PatchesSwitchedWarning, match="removed outside"):
        assert pf.list_forget_patches(pipe) == []
    name = pf.load_forget_patch(pipe, patch)
    pipe.unload_lora_weights()
    with pytest.warns(PatchesSwitchedWarning, match="removed outside"):
        assert pf.list_forget_patches(pipe) == []
    with pytest.raises(PatchforgeError, match="no forget patch named"):
        pf.set_forget_patch_weight(pipe, name, 0.5)
    base = run(tiny_sd1())
    assert torch.equal(run(pipe), base)
    pf.load_forget_patch(pipe, patch)
    pipe.unload_lora_weights()  # this time the guard notices during the forward pass itself
    with pytest.warns(PatchesSwitchedWarning, match="removed outside"):
        assert torch.equal(run(pipe), base)
    assert pf.list_forget_patches(pipe) == []


# ----------------------------------------------------------------------------- 10: exact unload after fuse

def test_fuse_unfuse_unload_cycles_are_bit_exact():
    pipe = tiny_sd1()
    patches = cached_patches("sd1")[:2]  # random A and B (a zero B would test nothing), UNet + text encoder
    base_state, base_out = pipeline_state(pipe), run(pipe)
    for cycle in range(12):  # (200 cycles: benchmarks/bench_security.py cycles)
        names = [pf.load_forget_patch(pipe, p, weight=0.5 + 0.1 * i) for i, p in enumerate(patches)]
        pf.set_forget_patch_weight(pipe, names[0], -0.3 + 0.05 * cycle)
        pf.fuse_forget_patches(pipe)
        pf.unfuse_forget_patches(pipe)
        pf.unload_forget_patches(pipe)
        assert pipeline_state(pipe) == base_state, cycle
    assert torch.equal(run(pipe), base_out)
    # control: PEFT's own unfuse (a subtraction) does move the base, so the test above can fail
    pipe.load_lora_weights(str(patches[0]), adapter_name="x")
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert pipeline_state(pipe) != base_state


def test_unfuse_through_diffusers_is_made_exact_too():
    pipe = tiny_sd1()
    base = pipeline_state(pipe)
    pf.load_forget_patch(pipe, cached_patches("sd1")[0])
    pf.fuse_forget_patches(pipe)
    pipe.unfuse_lora()  # diffusers' own unfuse; the kept copy is put back at the next patchforge step
    pf.unload_forget_patches(pipe)
    assert pipeline_state(pipe) == base


# ----------------------------------------------------------------------------- 11: fingerprint

def test_fingerprint_sees_half_the_weights_negated():
    """The old fingerprint hashed 16 values per tensor: negate every other weight, keep those 16,
    and a strict load passed. The v2 hash samples every s-th value (s odd) from a content-derived
    offset, so it sees the change."""
    pipe, forged = tiny_sd1(), tiny_sd1()
    with torch.no_grad():
        for _, p in fingerprint.base_parameters(forged.unet):
            flat = p.view(-1)
            k = min(16, flat.numel())
            idx = (torch.arange(k) * (flat.numel() - 1)) // max(k - 1, 1)
            kept = flat[idx].clone()
            flat[1::2] *= -1
            flat[idx] = kept
    a, b = fingerprint.base_fingerprint(pipe), fingerprint.base_fingerprint(forged)
    assert a[fmt.K_BASE_WEIGHTS] == b[fmt.K_BASE_WEIGHTS]  # the old hash is fooled
    assert a[fmt.K_BASE_WEIGHTS_V2] != b[fmt.K_BASE_WEIGHTS_V2]
    with pytest.raises(BaseModelMismatch, match="other weights"):
        pf.load_forget_patch(forged, cached_patches("sd1")[0], strict=True)


def test_fingerprint_sample_on_a_tensor_over_2_24_elements():
    n = 2**24 + 1001
    flat = torch.randn(n, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    sample = fingerprint._strided_sample(flat)
    seconds = time.perf_counter() - t0
    count = -(-n // (-(-n // fingerprint.SAMPLE_PER_TENSOR) | 1))  # ~SAMPLE_PER_TENSOR values sampled
    assert len(sample) == -(-count // 8)  # one sign bit each
    tail = flat.clone()
    tail[2**24:] *= -1  # only values past 2^24 change
    assert fingerprint._strided_sample(tail) != sample
    odd = flat.clone()
    odd[1::2] *= -1
    assert fingerprint._strided_sample(odd) != sample
    assert fingerprint._strided_sample(flat.half()) == sample  # fp16 and bf16 copies of the checkpoint agree
    assert fingerprint._strided_sample(flat.bfloat16()) == sample
    assert seconds < 0.5, seconds


# ----------------------------------------------------------------------------- 12, 13: size, reads, writes, twins

def test_size_and_header_are_checked_before_the_tensors(tmp_path):
    good = cached_patches("sd1")[0]
    with pytest.raises(PatchFormatError, match="limit"):
        fmt.read_patch(good, max_bytes=1000)
    # a header that promises a 4 GiB tensor the file does not hold: refused, nothing allocated
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [2**30]
    raw = json.dumps(header).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(PatchFormatError, match="shape") as err:
        fmt.read_patch(path)
    check_one_line(err.value)


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from patchforge.core import atomic
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    atomic.write_text(tmp_path / "x.txt", "hello")
    assert calls == ["fsync", "replace", "fsync"] and (tmp_path / "x.txt").read_text() == "hello"


def test_the_same_patch_twice_is_refused_unless_asked(pipe, tmp_path):
    import shutil
    good = cached_patches("sd1")[0]
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(good, copy)
    name = pf.load_forget_patch(pipe, good)
    state = pipeline_state(pipe)
    with pytest.raises(PatchforgeError, match="already loaded as .*double") as err:
        pf.load_forget_patch(pipe, copy)  # another name, the same tensors
    check_one_line(err.value)
    assert pipeline_state(pipe) == state
    second = pf.load_forget_patch(pipe, copy, allow_duplicate=True)
    assert [p.adapter_name for p in pf.list_forget_patches(pipe)] == [name, second]
    pf.unload_forget_patches(pipe)


# ----------------------------------------------------------------------------- 6, 7, 8: the Hub

BAD_PATHS = ["../../../../x", "../x", "a/../../x", "..", ".", "a//b", "a\\..\\b", "x\ny", "", "a/", "\x00"]


def _files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_no_write_outside_the_cache(fake_hub, monkeypatch, tmp_path):
    deep = tmp_path / "a" / "b" / "c" / "d" / "e" / "f"
    cache = deep / "cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    patch = cached_patches("sd1")[0]
    fake_hub.repos["me/p"] = {"sha": "1" * 40, "files": {"pytorch_lora_weights.safetensors": patch.read_bytes(),
                                                         "sub/pytorch_lora_weights.safetensors": patch.read_bytes()}}
    pipe = tiny_sd1()
    before = pipeline_state(pipe)
    absolute = str(tmp_path / "abs")
    for bad in BAD_PATHS + [absolute, "/" + absolute.lstrip("/")]:
        for kwargs in ({"revision": bad}, {"subfolder": bad}, {"weight_name": bad}):
            with pytest.raises(PatchforgeError) as err:
                pf.load_forget_patch(pipe, "me/p", **kwargs)
            check_one_line(err.value)
            with pytest.raises(PatchforgeError):
                hub.pull_patch("me/p", **kwargs)
    for bad_id in ("me/..", "a/b.git", "me/x\n"):
        with pytest.raises(PatchforgeError, match="not a Hub repo id") as err:
            pf.load_forget_patch(pipe, bad_id)
        check_one_line(err.value)
    assert pipeline_state(pipe) == before
    # what is allowed still works: a revision, a subfolder; everything written lies in the cache
    pf.load_forget_patch(pipe, "me/p", revision="main")
    pf.unload_forget_patches(pipe)
    pf.load_forget_patch(pipe, "me/p", subfolder="sub", revision="refs/pr/1")
    pf.unload_forget_patches(pipe)
    outside = [p for p in _files(tmp_path) if not p.is_relative_to(cache)]
    assert outside == [], outside


def test_pull_reads_the_patch_once(fake_hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_hub.repos["me/p"] = {"sha": "1" * 40,
                              "files": {"pytorch_lora_weights.safetensors": cached_patches("sd1")[0].read_bytes()}}
    reads = []
    real = hub.read_patch
    monkeypatch.setattr(hub, "read_patch", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert cli.main(["pull", "me/p"]) == 0
    assert len(reads) == 1 and "concept 0" in capsys.readouterr().out


def test_model_card_cannot_be_injected(tmp_path):
    from huggingface_hub import ModelCard

    evil = "x\ntags:\n- nsfw\nlicense: mit\n---"
    path = forge(tmp_path, "evil", meta={
        "patchforge.base_repo_id": evil, "patchforge.base_model": evil,
        "patchforge.concept": "cat](http://evil) <script>alert(1)</script> | x",
        "patchforge.hyperparameters": json.dumps({"lr`": "`) ![x](http://evil)", "rank": 4}),
        "patchforge.training_seconds": "fast", "patchforge.eval": json.dumps({"a|b": {"before": "<b>", "after": 1.0}})})
    patch = fmt.read_patch(path)
    card = hub.model_card(patch, "me/forget")
    data = ModelCard(card).data
    assert data.license != "mit" and "nsfw" not in data.tags and getattr(data, "base_model", None) is None
    assert set(data.tags) >= {"lora", "text-to-image", "diffusers", "stable-diffusion"}
    assert data.library_name == "diffusers" and data.base_model_relation == "adapter"
    body = card.split("---", 2)[2]
    assert "<script>" not in body and "](http://evil)" not in body
    assert re.search(r"^\| Concept \|[^|]*(\\\|[^|]*)*\|$", body, re.M)  # the concept's bar is escaped: one cell
    assert "&lt;script&gt;" in body and "Training |" not in body  # a non-numeric time is left out, no traceback
    # a real Hub id of the base becomes base_model
    good = fmt.read_patch(forge(tmp_path, "ok", meta={"patchforge.base_repo_id": "stabilityai/sd-turbo"}))
    assert ModelCard(hub.model_card(good, "me/forget")).data.base_model == "stabilityai/sd-turbo"


# ----------------------------------------------------------------------------- 8: merge, export, concept files

def test_merge_and_export_errors_are_one_line(tmp_path):
    from patchforge.core.concepts import load_concept_file
    from tiny_pipelines import tiny_sd2_vpred, make_patch

    other = make_patch(tiny_sd2_vpred(), tmp_path / "sd2.safetensors", "dog", text=False)
    sd1 = fmt.read_patch(cached_patches("sd1")[0])
    sd2 = fmt.read_patch(other)
    sd2.metadata["patchforge.base_architecture"] = sd1.metadata["patchforge.base_architecture"]  # lie to get past it
    with pytest.raises(PatchforgeError, match="disagree on the shape") as err:
        fmt.merge_patches([sd1, sd2])
    check_one_line(err.value)
    for case in ("rank-0", "rank-string", "alpha-string", "float8"):
        path = forge(tmp_path, case, **REPRODUCTIONS[case][0])
        for argv in (["merge", str(path), "-o", str(tmp_path / "m.safetensors")], ["export", str(path)]):
            assert cli.main(argv) == 2
    with pytest.raises(PatchforgeError, match="not a file"):
        load_concept_file(tmp_path)


# ----------------------------------------------------------------------------- 14: determinism end to end

def test_same_seed_same_patch_with_timing_out_of_the_tensors(tmp_path, monkeypatch):
    from patchforge.train.loop import TrainConfig, train_patch

    monkeypatch.setenv("PATCHFORGE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(steps=2, batch=2, progress=False, options={"ref_steps": 2, "n_refs": 2}, lr=1e-2)
    paths = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the global generator held before must not matter
        pipe = tiny_sd1()  # a fresh pipeline each time
        path, _ = train_patch(["custom:a photo of a cat"], "fmn", None, cfg, out=tmp_path / f"{i}.safetensors",
                              pipe=pipe)
        paths.append(path)
    a, b = (fmt.read_patch(p) for p in paths)
    assert a.digest == b.digest  # every tensor byte identical
    seconds = {"patchforge.training_seconds"}
    assert {k: v for k, v in a.metadata.items() if k not in seconds} == \
        {k: v for k, v in b.metadata.items() if k not in seconds}
    assert math.isfinite(float(a.metadata["patchforge.training_seconds"]))


# ----------------------------------------------------------------------------- 3b: a user's own fuse_lora

@pytest.mark.parametrize("order", ["fuse after loading mine", "fuse mine by name after a forward pass",
                                   "patch loaded after the user's fuse is refused"])
def test_a_users_fuse_lora_never_switches_the_patch_off(order):
    """diffusers' load_lora_weights leaves only the user's LoRA active, so a following fuse_lora() fuses
    only it; the patch must still act (fused too by the guard, said once) and the listing tell the truth."""
    patch, user = cached_patches("sd1")[0], cached_patches("sd1")[1]
    alone = tiny_sd1()
    alone.load_lora_weights(str(user), adapter_name="mine")
    user_only = run(alone)
    pipe = tiny_sd1()
    if order == "patch loaded after the user's fuse is refused":
        pipe.load_lora_weights(str(user), adapter_name="mine")
        pipe.fuse_lora()
        with pytest.raises(PatchforgeError, match="fused"):
            pf.load_forget_patch(pipe, patch)
        return
    name = pf.load_forget_patch(pipe, patch)
    pipe.load_lora_weights(str(user), adapter_name="mine")
    if order == "fuse after loading mine":
        pipe.fuse_lora()
    else:
        with pytest.warns(PatchesSwitchedWarning):
            both = run(pipe)
        pipe.fuse_lora(adapter_names=["mine"])
    with pytest.warns(PatchesSwitchedWarning, match="left out of a fuse"):
        out = run(pipe)
    assert not torch.allclose(out, user_only, atol=1e-3)  # the patch acts
    if order != "fuse after loading mine":
        assert torch.allclose(out, both, atol=1e-4)  # as much as when nothing was fused
    assert [(p.adapter_name, p.active, p.weight) for p in pf.list_forget_patches(pipe)] == [(name, True, 1.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next passes are quiet
        run(pipe)


def test_the_guard_sees_every_layer_and_leaves_disabled_user_loras_off():
    pipe = tiny_sd1()
    patch, user = cached_patches("sd1")[0], cached_patches("sd1")[1]
    name = pf.load_forget_patch(pipe, patch)
    patched = run(pipe)
    layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and name in m.lora_A]
    for layer in layers[1:]:  # every layer but the first (the old guard's probe)
        layer.set_adapter([])
    with pytest.warns(PatchesSwitchedWarning, match="switched off"):
        assert torch.equal(run(pipe), patched)
    for layer in layers[1:]:
        layer.set_scale(name, 0.0)
    with pytest.warns(PatchesSwitchedWarning, match="rescaled"):
        assert torch.equal(run(pipe), patched)
    assert pf.list_forget_patches(pipe)[0].weight == 1.0

    pipe.load_lora_weights(str(user), adapter_name="mine")
    pipe.disable_lora()  # the user turns every LoRA off: the patch comes back, the user's LoRA does not
    with pytest.warns(PatchesSwitchedWarning):
        assert torch.allclose(run(pipe), patched, atol=1e-6)
    assert pipe.get_active_adapters() == [name]


def test_without_patches_runs_the_users_loras_alone():
    pipe = tiny_sd1()
    patch, user = cached_patches("sd1")[0], cached_patches("sd1")[1]
    import patchforge

    alone = tiny_sd1()
    alone.load_lora_weights(str(user), adapter_name="mine")
    user_only = run(alone)
    pf.load_forget_patch(pipe, patch)
    pipe.load_lora_weights(str(user), adapter_name="mine")
    pipe.set_adapters([pf.list_forget_patches(pipe)[0].adapter_name, "mine"])
    both = run(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchforge.without_patches(pipe):
            assert torch.allclose(run(pipe), user_only, atol=1e-6)
        assert torch.equal(run(pipe), both)


def test_two_threads_changing_one_pipeline_one_is_refused(monkeypatch):
    import threading

    pipe = tiny_sd1()
    p1, p2 = cached_patches("sd1")[:2]
    started, release = threading.Event(), threading.Event()
    real = pf._load_adapter

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pf, "_load_adapter", slow)
    first = threading.Thread(target=pf.load_forget_patch, args=(pipe, p1))
    first.start()
    assert started.wait(10)
    with pytest.raises(PatchforgeError, match="another thread"):
        pf.load_forget_patch(pipe, p2)
    release.set()
    first.join(10)
    assert [p.concept for p in pf.list_forget_patches(pipe)] == ["concept 0"]


# ----------------------------------------------------------------------------- 15: output paths

def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_export_never_replaces_a_users_folder_or_the_model(tmp_path, monkeypatch, capsys):
    from tiny_pipelines import tiny_sd1 as build

    project = tmp_path / "project"
    model = project / "sd15"
    build().save_pretrained(model)
    patch = cached_patches("sd1")[0]
    capsys.readouterr()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    before = _tree(tmp_path)
    for out in (notes, model, model / "unet", project, tmp_path, Path(".")):
        argv = ["export", str(patch), "--format", "pipeline", "--model", str(model), "-o", str(out)]
        assert cli.main(argv) == 2, out
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "-o" in err, err
    assert _tree(tmp_path) == before  # nothing written, moved or removed
    # a new folder, then the same folder again (an earlier export of its own) work
    fused = tmp_path / "fused"
    for _ in range(2):
        assert cli.main(["export", str(patch), "--format", "pipeline", "--model", str(model), "-o", str(fused)]) == 0
    assert (fused / "model_index.json").is_file() and (fused / "patchforge.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    in_project = [t for t in before if t[0].startswith("project")]
    assert [t for t in _tree(tmp_path) if t[0].startswith("project")] == in_project  # the model untouched


@pytest.mark.parametrize("argv, message", [
    (["generate", "a cat", "-o", "g.txt"], "ending in"),
    (["generate", "a cat", "-o", "/etc/passwd/g.png"], "not a folder"),
    (["generate", "a cat", "--model", "/nonexistent"], "--model"),
    (["attack", "PATCH", "--out", "/etc/passwd/a.json"], "not a folder"),
    (["eval", "PATCH", "--out", "/etc/passwd"], "not a folder"),
    (["merge", "PATCH", "-o", "/etc/passwd/m.safetensors"], "not a folder"),
    (["export", "PATCH", "-o", "/etc/passwd/k.safetensors"], "not a folder"),
    (["train", "--concept", "style:stripes", "--out", "/etc/passwd/p.safetensors"], "not a folder"),
])
def test_outputs_are_checked_before_any_work(argv, message, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    # where every load ends (a name bound at import time elsewhere would keep a patched function for good)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = [str(cached_patches("sd1")[0]) if a == "PATCH" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    from patchforge.core.atomic import atomic_dir, write_text

    dead = 2 ** 22 + 7  # above the default pid_max: no such process
    (tmp_path / f".out.json.pf{dead}.x1.tmp.json").write_text("half")
    (tmp_path / f".fused.pf{dead}.x2.tmp").mkdir()
    (tmp_path / f".fused.pf{dead}.x2.tmp" / "unet.bin").write_bytes(b"0" * 100)
    (tmp_path / ".other.pfabc.tmp").write_text("not ours")
    write_text(tmp_path / "out.json", "{}")
    with atomic_dir(tmp_path / "fused") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pfabc.tmp", "fused", "out.json"]


# PEFT takes the first key that matches: "to_k" covers attn1.to_k before its own key does
PATTERN = {"to_k": 0.5, "attn1.to_k": 9.0, "attn2.to_k": 7.0,
           "down_blocks\\.0\\.attentions\\.0\\.transformer_blocks\\.0\\.attn2\\.to_v": 3.0}


def test_patchforge_reads_alpha_patterns_as_diffusers_applies_them(tmp_path, fake_hub):
    """The scale patchforge validates and applies is the one plain diffusers applies to the same file,
    and the file push publishes carries the same scales as exact module names."""
    path = forge(tmp_path, "pattern", lora={"alpha_pattern": PATTERN})
    plain = tiny_sd1()
    plain.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="plain")
    ours = tiny_sd1()
    pf.load_forget_patch(ours, path)
    assert torch.allclose(run(ours), run(plain), atol=1e-6)
    assert not torch.allclose(run(ours), run(tiny_sd1()), atol=1e-3)
    hub.push_patch(path, "someone/pattern")
    pulled = hub.pull_patch("someone/pattern")
    published = json.loads(fmt.read_patch(pulled).metadata["lora_adapter_metadata"])
    assert all(re.fullmatch(r"(\w|\\\.)+", k) for k in published["unet.alpha_pattern"])  # exact names only
    again = tiny_sd1()
    again.load_lora_weights(str(pulled.parent), weight_name=pulled.name, adapter_name="plain")
    assert torch.allclose(run(again), run(plain), atol=1e-6)


# ----------------------------------------------------------------------------- 16: hostile concept metadata

BAD_CONCEPTS = {"bracket": "[", "null": "null", "number": "[5]", "unknown": '[{"kind": "object", "name": "zzgrbl"}]',
                "braces": '[{"kind": "object", "name": "{0.__class__}"}]',
                "huge-name": json.dumps([{"kind": "object", "name": "x" * 1_000_000}]),
                "many": json.dumps([{"kind": "object", "name": f"c{i}"} for i in range(10_000)]),
                "kind-list": '[{"kind": ["object"], "name": "star"}]', "empty": "[]",
                "deep": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("verb", ["eval", "attack"])
def test_eval_and_attack_refuse_hostile_concept_metadata_in_one_line(verb, tmp_path, capsys):
    good = Path(__file__).parents[1] / "patches" / "object-star.fmn.safetensors"
    for case, value in BAD_CONCEPTS.items():
        path = forge(tmp_path, case, meta={"patchforge.concepts": value}, good=good)
        t0 = time.perf_counter()
        assert cli.main([verb, str(path), "--seeds", "1"]) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and len(err) < 400, (case, err[:300])
        assert time.perf_counter() - t0 < 20, case



# ----------------------------------------------------------------------------- 17: CLI inputs, file edge cases

@pytest.mark.parametrize("argv, message", [
    (["train", "--concept", "style:stripes", "--device", "bogus", "--dry-run"], "--device"),
    (["train", "--concept", "style:stripes", "--targets", "(((", "--dry-run"], "--targets"),
    (["train", "--concept", "style:stripes", "--set", "n_refs=0", "--dry-run"], "n_refs"),
    (["train", "--concept", "style:stripes", "--set", "n_refs=-1", "--dry-run"], "n_refs"),
    (["train", "--concept", "style:stripes", "--set", "ref_steps=0", "--dry-run"], "ref_steps"),
    (["train", "--concept", "style:stripes", "--set", "ref_guidance=-1e308", "--dry-run"], "ref_guidance"),
    (["generate", "a cat", "--guidance", "1e308"], "guidance"),
    (["generate", "a cat", "--device", "bogus"], "--device"),
])
def test_cli_inputs_that_used_to_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own refusal: also one line, before anything loads
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_hostile_header_entries_are_one_line(tmp_path, capsys):
    good = safetensors.safe_open(str(cached_patches("sd1")[0]), "pt")
    md = dict(good.metadata())
    for name, entry_key, entry in [("dtype-list", "unet.x.lora_A.weight", {"dtype": [[1]], "shape": [1],
                                                                            "data_offsets": [0, 4]}),
                                   ("newline-key", "unet.a\n\x1b[31mX\nY.lora_A.weight",
                                    {"dtype": "F64X", "shape": [1], "data_offsets": [0, 4]})]:
        path = tmp_path / f"{name}.safetensors"
        _raw_file(path, {"__metadata__": md, entry_key: entry}, b"\0" * 4)
        with pytest.raises(PatchforgeError) as err:
            fmt.read_patch(path)
        check_one_line(err.value)
        assert "\x1b" not in str(err.value)
        assert cli.main(["export", str(path)]) == 2 and cli.main(["merge", str(path), "-o", str(tmp_path / "m")]) == 2


def test_export_and_merge_refuse_files_that_disagree_with_themselves(tmp_path):
    from patchforge.io.kohya import export_kohya

    lying = forge(tmp_path, "claims-flux", meta={"patchforge.base_family": "flux.1-dev"})
    with pytest.raises(PatchforgeError, match="no kohya|disagree|forged"):
        export_kohya(lying, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()
    no_arch = fmt.read_patch(forge(tmp_path, "no-arch", meta={"patchforge.base_architecture": None}))
    with pytest.raises(BaseModelMismatch, match="no base architecture"):
        fmt.merge_patches([no_arch, fmt.read_patch(cached_patches("sd1")[1])])


# ----------------------------------------------------------------------------- 18: nothing private leaves the machine

def test_no_local_path_in_a_patch_its_exports_reports_or_card(tmp_path, fake_hub, monkeypatch, capsys):
    """Train from a model folder with a unique name: no byte of what patchforge writes names it."""
    from patchforge.pipeline import sampling as generation

    unique = "zq_private_folder_7731"
    model = tmp_path / unique / "sd15"
    tiny_sd1().save_pretrained(model)
    judge = tmp_path / "judge.py"
    judge.write_text("def judge(images, concept):\n    return [False] * len(images)\n")
    out = tmp_path / "out"
    out.mkdir()
    patch = out / "p.safetensors"
    monkeypatch.setattr(generation, "STEPS", 2)
    run_ = [["train", "--model", str(model), "--concept", "style:vangogh", "--method", "uce", "--out", str(patch),
             "--quiet"],
            ["export", str(patch), "-o", str(out / "p.kohya.safetensors")],
            ["export", str(patch), "--format", "pipeline", "--model", str(model), "-o", str(out / "fused")],
            ["eval", str(patch), "--model", str(model), "--seeds", "1", "--prompts", "1",
             "--judge", f"python:{judge}:judge", "--out", str(out)],
            ["push", str(patch), "someone/private-check"]]
    for argv in run_:
        assert cli.main(argv) == 0, argv
    pulled = hub.pull_patch("someone/private-check")
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download("someone/private-check", "README.md"))
    written = [p for p in out.rglob("*") if p.is_file()] + [pulled, card]
    assert len(written) > 10
    leaks = [str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else p.name for p in written
             if unique.encode() in p.read_bytes()]
    assert leaks == []


CONCEPT_FILES = {
    "billion-laughs": 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                      'b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
                      'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ntarget: [*d,*d,*d,*d]\n',
    "deep": "target: " + "[" * 5000 + "]" * 5000 + "\n",
    "target-empty": "target: []\n", "target-null": "target: null\n", "target-mapping": "target: {a: 1}\n",
    "guidance-word": "target: cat\nguidance: abc\n", "guidance-nan": "target: cat\nguidance: .nan\n",
    "guidance-inf": "target: cat\nguidance: .inf\n", "open-brace": 'target: ["a {"]\n',
    "numbered-brace": 'target: ["a {1}"]\n', "attribute-brace": 'target: ["a {0.__class__}"]\n',
    "list-in-list": "target: [[a, b]]\n", "newline": 'target: "a\\nb"\n',
}


@pytest.mark.parametrize("case", sorted(CONCEPT_FILES))
def test_hostile_concept_files_are_one_line_and_fast(case, tmp_path):
    from patchforge.core.concepts import load_concept_file

    path = tmp_path / "c.yaml"
    path.write_text(CONCEPT_FILES[case])
    t0 = time.perf_counter()
    with pytest.raises(PatchforgeError) as err:
        load_concept_file(path)
    check_one_line(err.value)
    assert time.perf_counter() - t0 < 2


def test_flux_export_refuses_parts_of_different_widths(tmp_path):
    from patchforge.io.kohya import export_kohya

    good = cached_patches("flux")[0]
    sd = safetensors.torch.load_file(str(good))
    key = next(k for k in sd if k.startswith("transformer.transformer_blocks.0.attn.to_k.lora_A"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)  # one part reads a wider input
    with safetensors.safe_open(str(good), "pt") as f:
        md = dict(f.metadata())
    path = tmp_path / "widths.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata=md)
    with pytest.raises(PatchforgeError, match="different widths") as err:
        export_kohya(path, tmp_path / "k.safetensors")
    check_one_line(err.value)
