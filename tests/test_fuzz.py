"""Fuzzing the patch reader and loader with hypothesis (derandomized: the same examples every run).

Properties: reading any bytes either gives a Patch or one PatchFormatError line; loading any forged
patch either works (and unloads back to the base bit for bit) or gives one PatchforgeError line and
leaves the pipeline bit for bit as it was, fingerprint included. The corpus is every reproduction
of test_security.py, run through the same checks, plus hypothesis' own examples."""
import json
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchforge.io import loading as pf
from patchforge.io import patch_format as fmt
from patchforge.errors import PatchforgeError, PatchFormatError
from test_security import REPRODUCTIONS, forge, pipeline_state
from tiny_pipelines import cached_patches, tiny_sd1

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# LoRA config keys: the allowed ones, the refused ones, and nonsense
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
               "modules_to_save", "layers_to_transform", "exclude_modules", "use_dora", "lora_bias", "bias",
               "lora_dropout", "fan_in_fan_out", "layer_replication", "peft_type", "zzz"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["pissa", "olora", "gaussian", "none", "all", "4", "", "conv_in", "(a+)+$"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.sampled_from(["to_q", "to_k", ".*"]),
                                                                          SCALARS, max_size=2))
META_KEYS = ["patchforge.base_architecture", "patchforge.base_weights_v2", "patchforge.concept",
             "patchforge.format_version", "lora_adapter_metadata", "patchforge.base_repo_id"]
TENSOR_OPS = {
    "none": lambda sd: sd,
    "half": lambda sd: {k: v.half() for k, v in sd.items()},
    "bf16": lambda sd: {k: v.bfloat16() for k, v in sd.items()},
    "int": lambda sd: {k: v.to(torch.int32) for k, v in sd.items()},
    "float8": lambda sd: {k: v.to(torch.float8_e5m2) for k, v in sd.items()},
    "big-B": lambda sd: {k: v * 1e4 if "lora_B" in k else v for k, v in sd.items()},
    "nan": lambda sd: {k: v.clone().fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(sd.items())},
    "drop-B": lambda sd: {k: v for i, (k, v) in enumerate(sd.items()) if not (i == 1 and "lora_B" in k)},
    "transpose": lambda sd: {k: v.T.contiguous() if i == 0 else v for i, (k, v) in enumerate(sd.items())},
    "rank-cut": lambda sd: {k: (v[:1] if "lora_A" in k else v[:, :1]).contiguous() for k, v in sd.items()},
    "extra": lambda sd: {**sd, "unet.conv_in.weight": torch.zeros(2, 2)},
    "outside": lambda sd: {**sd, "vae.x.lora_A.weight": torch.zeros(2, 2)},
    "scalar": lambda sd: {k: v.reshape(-1)[:1].reshape(()) if i == 0 else v for i, (k, v) in enumerate(sd.items())},
}


def _one_line(err):
    assert str(err) and "\n" not in str(err), str(err)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1()


def check_load(pipe, path) -> bool:
    """The loader property; returns whether the file loaded."""
    before = pipeline_state(pipe)
    try:
        pf.load_forget_patch(pipe, path)
    except PatchforgeError as err:
        _one_line(err)
        loaded = False
    else:
        pf.unload_forget_patches(pipe)
        loaded = True
    assert pipeline_state(pipe) == before
    assert pf.list_forget_patches(pipe) == [] and pipe.get_list_adapters() == {}
    return loaded


def test_corpus_of_reproductions(pipe, tmp_path):
    """Every reproduction of the issue, through the fuzz test's own properties."""
    for name, (args, refused) in REPRODUCTIONS.items():
        path = forge(tmp_path, name, **args)
        try:
            fmt.read_patch(path)
        except PatchFormatError as err:
            _one_line(err)
        assert check_load(pipe, path) is not refused, name


@settings(FUZZ, max_examples=40)
@given(lora=st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=3),
       meta=st.dictionaries(st.sampled_from(META_KEYS), st.one_of(st.none(), st.text(max_size=12)), max_size=2),
       op=st.sampled_from(sorted(TENSOR_OPS)))
def test_fuzz_loader(pipe, lora, meta, op):
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = forge(Path(folder), "f", lora=json.loads(json.dumps(lora)), meta=meta, tensors=TENSOR_OPS[op])
        except (ValueError, TypeError, RuntimeError, safetensors.SafetensorError):
            return  # safetensors itself would not write this file
        check_load(pipe, path)


def _good_bytes() -> bytes:
    return cached_patches("sd1")[1].read_bytes()


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_reader_bytes(data):
    """Byte-level mutations of a good file: header flips, length lies, truncation, splices."""
    blob = bytearray(_good_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    kind = data.draw(st.sampled_from(["flip", "length", "truncate", "splice", "tail"]))
    if kind == "flip":
        for at, value in data.draw(st.lists(st.tuples(st.integers(8, 8 + n - 1), st.integers(0, 255)), min_size=1,
                                            max_size=8)):
            blob[at] = value
    elif kind == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 64), n + 64)))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "splice":
        at = data.draw(st.integers(8, 8 + n))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        blob += data.draw(st.binary(min_size=1, max_size=16))
    try:
        fmt.parse_patch(bytes(blob))
    except PatchFormatError as err:
        _one_line(err)


@settings(FUZZ, max_examples=150)
@given(entry=st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "I64", "BOOL", "U8", "x", 3]),
    "shape": st.lists(st.integers(-2, 2**41), max_size=6) | st.text(max_size=3),
    "data_offsets": st.lists(st.integers(-5, 2**63), max_size=3)}))
def test_fuzz_reader_header_entries(entry):
    """Structurally valid JSON headers whose first tensor entry lies in every way."""
    data = _good_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key] = entry
    raw = json.dumps(header).encode()
    try:
        fmt.parse_patch(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    except PatchFormatError as err:
        _one_line(err)
    else:
        pytest.fail(f"a damaged entry was accepted: {entry}")


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """A fake Hub serving one patch, and a Hub cache six folders deep inside a watched root."""
    from huggingface_hub import constants

    from fake_hub import FakeHub

    root = tmp_path_factory.mktemp("hubfuzz")
    cache = root / "a" / "b" / "c" / "d" / "e" / "f" / "cache"
    with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", server.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setenv("HF_TOKEN", "hf_fake")
        data = cached_patches("sd1")[0].read_bytes()
        server.repos["me/p"] = {"sha": "2" * 40, "files": {"pytorch_lora_weights.safetensors": data,
                                                          "x/pytorch_lora_weights.safetensors": data}}
        yield root, cache


@settings(FUZZ, max_examples=60)
@given(value=st.text(alphabet="./\\ax-_~:%\n", max_size=10), where=st.sampled_from(["revision", "subfolder",
                                                                                    "weight_name"]))
def test_fuzz_hub_names_never_write_outside_the_cache(hub_root, value, where):
    from patchforge.io import hub

    root, cache = hub_root
    try:
        path = hub.resolve_patch_file("me/p", **{where: value})
    except PatchforgeError as err:
        _one_line(err)
    else:
        assert Path(path).resolve().is_relative_to(cache.resolve())
    outside = [p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(cache)]
    assert outside == [], (where, value, outside)


# ----------------------------------------------------------------------------- concept files

YAML_WORDS = st.sampled_from(["style:stripes", "object:star", "a cat", "{}", "{", "{1}", "}", "a {} b", "{0.x}", "",
                              "\n", "*a", "&a", "!!python/object:os.system", "x" * 2000, "1e308", ".nan"])
YAML_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(), YAML_WORDS),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                               ["target", "anchor", "preserve", "words", "kind", "name", "guidance", "zz"]), inner,
                               max_size=4), max_leaves=12)


@settings(FUZZ, max_examples=300)
@given(data=YAML_VALUES, raw=st.sampled_from(["", "a: &a [1,2]\nb: [*a,*a]\n", "[" * 50, "target: !!binary x\n",
                                             "\t- x", "target: [a, {b: c}]\n"]))
def test_fuzz_concept_files(data, raw):
    """Any YAML (typed nonsense, aliases, tags, deep nesting) gives concept specs or one PatchforgeError line,
    fast."""
    import time

    import yaml

    from patchforge.core.concepts import load_concept_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump(data) + raw)
        t0 = time.perf_counter()
        try:
            load_concept_file(path)
        except PatchforgeError as err:
            _one_line(err)
        assert time.perf_counter() - t0 < 2


# ----------------------------------------------------------------------------- concepts a patch names (eval, attack)

CONCEPT_ITEMS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                                       st.sampled_from(["star", "stripes", "kiko", "zzz", "{0}", "x" * 300])),
                             lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                 st.sampled_from(["kind", "name", "to", "x"]), inner, max_size=3), max_leaves=10)


@settings(FUZZ, max_examples=300)
@given(value=CONCEPT_ITEMS, garble=st.sampled_from(["", "[", "]]", "\x00", "{"]))
def test_fuzz_patch_concept_metadata(value, garble, tmp_path_factory):
    """What eval and attack read from a patch before loading any model: its concepts, each known to the
    toy world, or one PatchforgeError line."""
    from patchforge.core import worlds
    from patchforge.eval.rows import patch_targets

    good = Path(__file__).parents[1] / "patches" / "object-star.fmn.safetensors"
    folder = tmp_path_factory.mktemp("concepts")
    path = forge(folder, "c", meta={"patchforge.concepts": json.dumps(value) + garble}, good=good)
    for world in (worlds.for_model(None), None):
        try:
            patch_targets(path, world)
        except PatchforgeError as err:
            _one_line(err)
