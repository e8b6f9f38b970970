"""Patch files: round trip, metadata, atomic writes, exact merging, and a reader that rejects bad input."""
import json
import os
import random
import struct

import pytest
import safetensors.torch
import torch

from patchforge import cli
from patchforge.io import loading as pf
from patchforge.io import fingerprint
from patchforge.io import patch_format as fmt
from patchforge.errors import PatchFormatError
from tiny_pipelines import BUILDERS, cached_patches, make_patch, run


def test_file_layout_and_metadata(tmp_path):
    pipe = BUILDERS["sdxl"]()
    path = make_patch(pipe, tmp_path, "a cat", rank=4, alpha=2.0)
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes, not owner-only
    with safetensors.safe_open(str(path), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.encoder.") for k in keys)
    lora_md = json.loads(md["lora_adapter_metadata"])
    assert lora_md["unet.r"] == 4 and lora_md["unet.lora_alpha"] == 2.0 and lora_md["text_encoder_2.r"] == 4
    for key in ("format_version", "concept", "method", "hyperparameters", "base_model", "base_family",
                "base_architecture", "base_weights", "targets", "training_seconds", "device"):
        assert f"patchforge.{key}" in md
    assert md["patchforge.concept"] == "a cat" and md["patchforge.base_family"].startswith("sdxl")
    patch = fmt.read_patch(tmp_path)
    assert patch.components == ["unet", "text_encoder", "text_encoder_2"]
    assert patch.scale("unet", patch.modules("unet")[0]) == 0.5


def test_fingerprint_is_stable_and_dtype_independent():
    a, b = BUILDERS["sd1"](), BUILDERS["sd1"]()
    assert fingerprint.base_fingerprint(a) == fingerprint.base_fingerprint(b)
    assert fingerprint.base_fingerprint(a.to(torch.float16)) == fingerprint.base_fingerprint(b)
    assert fingerprint.base_fingerprint(BUILDERS["sd2"]())["patchforge.base_prediction_type"] == "v_prediction"
    assert fingerprint.base_fingerprint(BUILDERS["sd1"](seed=1))["patchforge.base_weights"] != \
        fingerprint.base_fingerprint(b)["patchforge.base_weights"]


def test_merge_is_exact_and_loads_like_the_stack(tmp_path):
    paths = cached_patches("sd1")
    patches = [fmt.read_patch(p) for p in paths]
    weights = [1.0, 0.5, -0.7]
    merged = fmt.merge_patches(patches, weights)
    for comp in merged.components:
        for module in merged.modules(comp):
            expected = sum(w * p.delta(comp, module) for p, w in zip(patches, weights))
            assert torch.allclose(merged.delta(comp, module), expected, atol=1e-6)
    out = fmt.write_patch(merged, tmp_path / "merged.safetensors")
    pipe = BUILDERS["sd1"]()
    for p, w in zip(paths, weights):
        pf.load_forget_patch(pipe, p, weight=w)
    stacked = run(pipe)
    pf.unload_forget_patches(pipe)
    pf.load_forget_patch(pipe, out)
    assert torch.allclose(run(pipe), stacked, atol=1e-5)
    assert json.loads(fmt.read_patch(out).metadata["patchforge.merged_from"])[2]["weight"] == -0.7


def test_merge_cli_and_partial_components(tmp_path):
    pipe = BUILDERS["sd1"]()
    unet_only = make_patch(pipe, tmp_path / "u.safetensors", "u", seed=3, text=False)
    full = cached_patches("sd1")[0]
    assert cli.main(["merge", str(unet_only), str(full), "-o", str(tmp_path / "m"), "--weights", "2", "1"]) == 0
    merged = fmt.read_patch(tmp_path / "m")
    a, b = fmt.read_patch(unet_only), fmt.read_patch(full)
    mod = b.modules("text_encoder")[0]
    assert torch.allclose(merged.delta("text_encoder", mod), b.delta("text_encoder", mod), atol=1e-6)
    mod = a.modules("unet")[0]
    assert torch.allclose(merged.delta("unet", mod), 2 * a.delta("unet", mod) + b.delta("unet", mod), atol=1e-6)
    assert cli.main(["merge", str(full), str(tmp_path / "sd2"), "-o", str(tmp_path / "x")]) == 2  # missing file


def _write(path, tensors, metadata):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_files_each_give_one_clear_line(tmp_path):
    good = cached_patches("sd1")[0]
    data = good.read_bytes()
    md = fmt.read_patch(good).metadata
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "pickle": b"PK\x03\x04" + b"\0" * 64,
        "huge-header": struct.pack("<Q", 2**40) + b"{}",
        "not-json": struct.pack("<Q", 4) + b"abcd",
    }
    tensors = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(3, 2)}
    cases_files = {
        "plain-lora": _write(tmp_path / "plain.safetensors", tensors, {"format": "pt"}),
        "wrong-keys": _write(tmp_path / "wk.safetensors", {"unet.a.weight": torch.zeros(2)}, md),
        "bad-shapes": _write(tmp_path / "bs.safetensors", {"unet.a.lora_A.weight": torch.zeros(2, 4),
                                                           "unet.a.lora_B.weight": torch.zeros(3, 5)}, md),
        "half-pair": _write(tmp_path / "hp.safetensors", {"unet.a.lora_A.weight": torch.zeros(2, 4)}, md),
    }
    for name, blob in cases.items():
        cases_files[name] = tmp_path / f"{name}.safetensors"
        cases_files[name].write_bytes(blob)
    with open(tmp_path / "real-pickle.bin", "wb") as f:
        torch.save({"x": torch.zeros(1)}, f)
    cases_files["real-pickle"] = tmp_path / "real-pickle.bin"
    for name, path in cases_files.items():
        with pytest.raises(PatchFormatError) as err:
            fmt.read_patch(path)
        msg = str(err.value)
        assert "\n" not in msg and path.name in msg, (name, msg)  # one line, naming the file
    # a patch whose modules the pipeline lacks: refused before anything is loaded
    pipe = BUILDERS["sd1"]()
    before = run(pipe)
    # (same architecture recorded: a patch that records none is refused as a base mismatch, see test_security)
    fake = _write(tmp_path / "odd.safetensors", tensors, {**md, "lora_adapter_metadata": json.dumps({"unet.r": 2})})
    with pytest.raises(PatchFormatError, match="does not have"):
        pf.load_forget_patch(pipe, fake)
    assert torch.equal(run(pipe), before) and pipe.get_list_adapters() == {}


def test_fuzz_headers_never_crash_the_reader():
    data = bytearray(cached_patches("sd1")[1].read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        blob = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes inside the JSON header
            for _ in range(rng.randint(1, 8)):
                blob[8 + rng.randrange(n)] = rng.randrange(256)
        elif kind == 1:  # lie about the header length
            blob[:8] = struct.pack("<Q", max(0, n + rng.randint(-50, 50)))
        elif kind == 2:  # truncate anywhere
            blob = blob[: rng.randrange(len(blob))]
        else:  # splice random bytes into the header
            at = 8 + rng.randrange(n)
            blob[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        try:
            fmt.parse_patch(bytes(blob))
            outcomes["ok"] += 1
        except PatchFormatError as err:
            assert "\n" not in str(err)
            outcomes["error"] += 1
    assert outcomes["error"] > 200


def test_header_lengths_that_look_like_a_pickle_still_load(tmp_path):
    """A safetensors file starts with its header length: 0x80 (pickle's first byte) or b"PK" (a zip's)
    are legal lengths, so such a patch must load; a real pickle is still refused as one."""
    good = cached_patches("sd1")[0]
    patch = fmt.read_patch(good)
    src = safetensors.torch.load_file(str(good))
    n0 = struct.unpack("<Q",
                       _write(tmp_path / "p.safetensors", src, {**patch.metadata, "zz_pad": ""}).read_bytes()[:8])[0]
    for want, length in ((b"\x80", 0x180 + 0x10000 * (n0 // 0x10000 + 1)),
                         (b"PK", 0x4B50 + 0x10000 * (n0 // 0x10000 + 1))):
        pad = length - n0  # 8 more characters of metadata, 8 more header bytes (the header is 8-aligned)
        path = _write(tmp_path / "p.safetensors", src, {**patch.metadata, "zz_pad": "x" * pad})
        assert path.read_bytes()[: len(want)] == want
        assert fmt.read_patch(path).metadata["zz_pad"] == "x" * pad
    with open(tmp_path / "real-pickle.bin", "wb") as f:
        torch.save({"x": torch.zeros(1)}, f)
    with pytest.raises(PatchFormatError, match="pickle"):
        fmt.read_patch(tmp_path / "real-pickle.bin")
