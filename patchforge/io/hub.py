"""Forget patches on the Hugging Face Hub: resolve a source to a local file, push with a model card,
pull into the local cache. Everything goes through huggingface_hub's own client (HF_ENDPOINT,
HF_HUB_OFFLINE, HF_TOKEN and the cache work as users expect)."""
from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from pathlib import Path

from ..core.output_paths import IMAGE_SUFFIXES
from ..errors import PatchforgeError
from .kohya import export_kohya
from .patch_format import (DEFAULT_WEIGHT_NAME, K_BASE_FAMILY, K_BASE_ID, K_BASE_REPO_ID, K_CONCEPT, K_DEVICE, K_EVAL,
                           K_HPARAMS, K_METHOD, K_SECONDS, Patch, one_line, public_metadata, read_patch, unit_scale,
                           write_patch)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # looks like a repo id (then huggingface_hub validates it)
IMAGE_NAMES = ("before_after.png", "before_after.jpg")  # shown in the card when found beside the patch
KOHYA_NAME = "forget_patch.kohya.safetensors"  # the same patch for ComfyUI, AUTOMATIC1111/Forge and kohya
# The base families' licenses (Hub license ids; "other" with a name and a link where the Hub has no id)
LICENSES = {"sd1": ("creativeml-openrail-m", None, None), "sd2": ("openrail++", None, None),
            "sdxl": ("openrail++", None, None),
            "sd3": ("other", "stabilityai-ai-community",
                    "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"),
            "flux.1-dev": ("other", "flux-1-dev-non-commercial-license",
                           "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
            "flux.1-schnell": ("apache-2.0", None, None)}


def resolve_patch_file(src, *, weight_name: str | None = None, subfolder: str | None = None,
                       revision: str | None = None, token: str | None = None, cache_dir: str | None = None) -> Path:
    """A local patch file for `src`: a file, a folder (weight_name or the default name inside), or a
    Hub repo id fetched through the Hub cache (works offline once cached).

    `weight_name`, `subfolder` and `revision` are checked before any I/O: relative, no `..`, no
    backslash or control character, so nothing is read or written outside the folder or the cache."""
    check_relative(weight_name, "weight_name")
    check_relative(subfolder, "subfolder")
    check_relative(revision, "revision")
    path = Path(src)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if weight_name:
            return folder / weight_name
        if (folder / DEFAULT_WEIGHT_NAME).is_file():
            return folder / DEFAULT_WEIGHT_NAME
        found = sorted(folder.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise PatchforgeError(f"'{folder}' holds {len(found)} .safetensors files and no {DEFAULT_WEIGHT_NAME}: "
                              f"pass weight_name=")
    if not REPO_ID.match(str(src)):
        raise PatchforgeError(f"no patch at '{one_line(src)}': give a .safetensors file, a folder holding one, or a "
                              f"Hub repo id (owner/name)")
    check_repo_id(str(src))
    return _download(str(src), weight_name or DEFAULT_WEIGHT_NAME, subfolder=subfolder, revision=revision,
                     token=token, cache_dir=cache_dir)


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules (`me/..` and `a/b.git` pass a simple regex but not these)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str) or "/" not in repo_id:
            raise HFValidationError("use owner/name")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PatchforgeError(f"'{one_line(repo_id)}' is not a Hub repo id: use owner/name (letters, digits, "
                              f"'-', '_', '.'; no '..', not ending in .git)") from None


def check_relative(value: str | None, what: str) -> None:
    """A file name, folder or revision that must stay a relative path below where it is used."""
    if value is None:
        return
    parts = value.split("/") if isinstance(value, str) else []
    if not isinstance(value, str) or not value or len(value) > 255 or "\\" in value or \
            not value.isprintable() or any(p in ("", ".", "..") for p in parts):
        raise PatchforgeError(f"{what} {one_line(value, 60)!r} is not allowed: give a relative name without '..', "
                              f"empty parts, backslashes or control characters")


def _download(repo_id: str, filename: str, **kwargs) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as e

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="model", **kwargs))
    except e.RepositoryNotFoundError:
        raise PatchforgeError(f"no Hub repo '{repo_id}' (or it is private and no token was given): check the id, "
                              f"or log in with `hf auth login`") from None
    except e.RevisionNotFoundError:
        raise PatchforgeError(f"Hub repo '{repo_id}' has no revision '{one_line(kwargs.get('revision'))}': check the "
                              f"branch, tag or commit") from None
    except e.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise PatchforgeError(f"'{repo_id}' is not in the local Hub cache and the Hub cannot be reached (offline?): "
                              f"run `patchforge pull {repo_id}` while online") from None
    except e.EntryNotFoundError:
        raise PatchforgeError(f"Hub repo '{repo_id}' has no file '{one_line(filename)}': pass weight_name= (and "
                              f"subfolder=) naming the patch file") from None
    except e.HfHubHTTPError as err:
        raise PatchforgeError(f"the Hub refused '{repo_id}' "
                              f"({one_line(str(err).splitlines()[0] if str(err) else err, 120)}): "
                              f"check the id and your token") from None
    except ValueError as err:  # huggingface_hub's own path checks (HFValidationError is one)
        raise PatchforgeError(f"'{repo_id}' / '{one_line(filename)}' was refused by huggingface_hub "
                              f"({one_line(str(err), 120)})") from None


# ----------------------------------------------------------------------------- model card

TAGS = ["lora", "concept-erasure", "patchforge", "text-to-image", "diffusers", "stable-diffusion"]
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|~])")


def md_text(value, limit: int = 200) -> str:
    """Text from a patch file, safe inside one markdown line or table cell: one line, HTML and
    markdown syntax (links, images, code, emphasis, table bars) escaped."""
    text = one_line(value, limit).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def family_tags(family: str) -> list[str]:
    """The Hub tags of a patch for this base family (the conventions of diffusers' LoRA training cards)."""
    if family.startswith("flux"):  # not a Stable Diffusion model
        return [t for t in TAGS if t != "stable-diffusion"] + ["flux", "flux-diffusers", "template:sd-lora"]
    if family.startswith("sd3"):
        return TAGS + ["sd3", "sd3-diffusers", "template:sd-lora"]
    return TAGS + ["stable-diffusion-diffusers"] + (["stable-diffusion-xl"] if family.startswith("sdxl") else [])


def family_license(family: str, repo_id: str) -> tuple[str, str | None, str | None]:
    """(license, license_name, license_link): the base family's license; for a base of no known family
    (the toy, a local model) the patch carries its base's license, said in the card's License section."""
    for prefix, found in LICENSES.items():
        if family.startswith(prefix):
            return found
    return "other", "same-as-base-model", f"https://huggingface.co/{repo_id}/blob/main/README.md#license"


def has_kohya_form(patch: Patch) -> bool:
    """SD 1.x/2.x/XL and FLUX.1 patches get a kohya-format twin: ComfyUI and AUTOMATIC1111 do not map
    diffusers' PEFT keys of a UNet. SD3 has no kohya layout; ComfyUI reads its PEFT keys."""
    family = patch.metadata.get(K_BASE_FAMILY, "")
    return "unet" in patch.components or family.startswith("flux")


def base_repo_id(metadata: dict[str, str]) -> str | None:
    """The base's Hub repo id when the patch records a valid one (never a local path or free text)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    value = metadata.get(K_BASE_REPO_ID)
    try:
        validate_repo_id(value)
    except (HFValidationError, TypeError):
        return None
    return value


def model_card(patch: Patch, repo_id: str, image: str | None = None, report: dict | None = None) -> str:
    """README.md in Hub conventions for LoRA repos, so the Hub links the base model and shows the
    repo as an adapter of it. The YAML comes from huggingface_hub's ModelCardData; every text taken
    from the patch is escaped (a patch's metadata is untrusted)."""
    from huggingface_hub import ModelCard, ModelCardData

    md = patch.metadata
    base = base_repo_id(md)
    tags = family_tags(md.get(K_BASE_FAMILY, ""))
    license_id, license_name, license_link = family_license(md.get(K_BASE_FAMILY, ""), repo_id)
    data = ModelCardData(library_name="diffusers", base_model=base, base_model_relation="adapter",
                         tags=tags, license=license_id, license_name=license_name, license_link=license_link,
                         pipeline_tag="text-to-image")
    concept, method = md_text(md.get(K_CONCEPT, "?")), md_text(md.get(K_METHOD, "?"))
    base_text = f"[{base}](https://huggingface.co/{base})" if base else md_text(md.get(K_BASE_ID, "unknown"))
    lines = [f"# Forget patch: {concept}", "",
             f"A patchforge forget patch for {base_text}: a LoRA adapter that makes the model forget **{concept}**.",
             "",
             "| | |", "|---|---|", f"| Concept | {concept} |", f"| Method | {method} |",
             f"| Base model | {base_text} ({md_text(md.get(K_BASE_FAMILY, '?'))}) |",
             f"| Components | {', '.join(patch.components)} |"]
    seconds = _number(md.get(K_SECONDS))
    if seconds is not None:
        lines.append(f"| Training | {seconds:.0f} s on {md_text(md.get(K_DEVICE, '?'), 40)} |")
    lines += _hparam_rows(md.get(K_HPARAMS))
    lines += ["", "## Evaluation", ""] + (_eval_report_rows(report) if report else _eval_table(md.get(K_EVAL)))
    if image:
        lines += ["", "## Before / after", "", f"![before and after]({image})"]
    lines += ["", "## Files", "", f"- `{DEFAULT_WEIGHT_NAME}`: diffusers / PEFT keys, for patchforge and diffusers"
              + ("; ComfyUI reads it too" if not has_kohya_form(patch) else "")]
    if has_kohya_form(patch):
        lines.append(f"- `{KOHYA_NAME}`: the same weights in kohya's layout (`lora_unet_…`, `.alpha`), for "
                     "ComfyUI, AUTOMATIC1111/Forge and kohya")
    lines += ["", "Both apply the same change at weight 1 (each module's scale is folded into its weights).",
              "", "## Use", "", "patchforge (stacks beside your LoRAs; the patch stays on):", "", "```python",
              "import patchforge", f'patchforge.load_forget_patch(pipe, "{repo_id}", weight=1.0)', "```", "",
              "diffusers:", "", "```python",
              f'pipe.load_lora_weights("{repo_id}", weight_name="{DEFAULT_WEIGHT_NAME}", adapter_name="forget")',
              "```", ""]
    kohya = KOHYA_NAME if has_kohya_form(patch) else DEFAULT_WEIGHT_NAME
    lines += [f"ComfyUI: put `{kohya}` in `models/loras`; add a *LoraLoader* node after the checkpoint loader "
              "(strength 1.0 for model and clip).", ""]
    if has_kohya_form(patch):
        lines += [f"AUTOMATIC1111 / Forge: put `{KOHYA_NAME}` in `models/Lora`; add "
                  f"`<lora:{KOHYA_NAME.removesuffix('.safetensors')}:1>` to the prompt.", "",
                  "kohya sd-scripts: `python networks/merge_lora.py --sd_model BASE.safetensors --save_to "
                  f"OUT.safetensors --models {KOHYA_NAME} --ratios 1`.", ""]
    lines += ["A LoRA patch changes what this pipeline generates; anyone holding the weights can remove it.", "",
              "## License", "", "This patch is a derivative of its base model and carries the base model's license.",
              ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


HEADLINE = (("efficacy", "target left, training prompts"), ("generality", "target left, held-out paraphrases"),
            ("specificity.neighbours", "neighbour concepts kept"), ("specificity.other_kinds", "other kinds kept"),
            ("specificity.compositional", "compositional prompts kept"))


def _eval_report_rows(report: dict) -> list[str]:
    """The headline of `patchforge eval`'s JSON report (base -> patched, 95 % interval), with the date and
    the model it was measured on."""
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    metrics = report.get("metrics") if isinstance(report.get("metrics"), dict) else {}
    out = [f"Measured with `patchforge eval` on {md_text(settings.get('model', '?'), 60)}, "
           f"{md_text(settings.get('date', 'date not recorded'), 20)}, "
           f"judge {md_text(settings.get('judge', '?'), 30)}, "
           f"{md_text(settings.get('seeds', '?'), 8)} seeds a prompt:", "",
           "| measure | base | patched | 95 % interval |", "|---|---|---|---|"]
    for key, label in HEADLINE:
        m = metrics.get(key)
        if not isinstance(m, dict):
            continue
        ci = m.get("ci_patched") if isinstance(m.get("ci_patched"), list) and len(m["ci_patched"]) == 2 else None
        out.append(f"| {label} | {_pct(m.get('base'))} | {_pct(m.get('patched'))} | "
                   + (f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "") + " |")
    return out


def _pct(v) -> str:
    return f"{100 * v:.0f} %" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _number(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _hparam_rows(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        hparams = json.loads(raw)
    except (ValueError, RecursionError):
        hparams = None
    if not isinstance(hparams, dict):
        return [f"| Hyperparameters | {md_text(raw)} |"]
    return [f"| {md_text(k, 60)} | {md_text(json.dumps(v) if not isinstance(v, str) else v, 120)} |"
            for k, v in list(hparams.items())[:40]]


def _eval_table(raw: str | None) -> list[str]:
    try:
        summary = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        summary = None
    if not isinstance(summary, dict) or not summary:
        return ["No evaluation was recorded with this patch."]
    rows = list(summary.items())[:60]
    if all(isinstance(v, dict) for _, v in rows):  # {metric: {"before": x, "after": y, ...}}
        cols = list(dict.fromkeys(c for _, v in rows for c in v))[:8]
        out = ["| Metric | " + " | ".join(md_text(c, 40) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        return out + [f"| {md_text(k, 60)} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for k, v in rows]
    return ["| Metric | Value |", "|---|---|"] + [f"| {md_text(k, 60)} | {_fmt(v)} |" for k, v in rows]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else md_text(v if isinstance(v, (str, int)) else json.dumps(v), 60)


# ----------------------------------------------------------------------------- push / pull

def write_published(patch: Patch, folder: Path) -> list[tuple[str, Path]]:
    """The weight files `push` uploads, written into `folder`: (name in the repo, path). The PEFT file
    with each module's scale folded into B (alpha = rank: every tool applies the same delta whether it
    reads lora_adapter_metadata, .alpha tensors or neither) and, for the families kohya's layout covers,
    the same weights in that layout for ComfyUI, AUTOMATIC1111/Forge and kohya."""
    upload = write_patch(unit_scale(patch), folder / DEFAULT_WEIGHT_NAME)
    files = [(DEFAULT_WEIGHT_NAME, upload)]
    if has_kohya_form(patch):
        files.append((KOHYA_NAME, export_kohya(upload, folder / KOHYA_NAME)))
    return files


def push_patch(patch_path, repo_id: str, *, private: bool = False, token: str | None = None,
               image: str | None = None, commit_message: str | None = None) -> str:
    """Create (or reuse) `repo_id` and commit the patch as pytorch_lora_weights.safetensors with a
    model card and, when given or found beside the patch, a before/after image. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as e

    check_repo_id(repo_id)
    patch = read_patch(patch_path)  # never publish a file that does not validate
    report_path = patch.path.with_suffix(".eval.json")  # `patchforge eval`'s report, beside the patch
    if image is None:
        candidates = [patch.path.with_suffix(".eval.png"), *(patch.path.parent / n for n in IMAGE_NAMES)]
        image = next((str(c) for c in candidates if c.is_file()), None)
    report = _read_report(report_path)
    if image and (Path(image).suffix.lower() not in IMAGE_SUFFIXES or not Path(image).is_file()):
        raise PatchforgeError(f"--image '{one_line(image)}' is not a {'/'.join(IMAGE_SUFFIXES)} file")
    image_name = "before_after" + Path(image).suffix.lower() if image else None  # our name, not the user's
    # What is published is the file as patchforge reads it, written anew: LoRA config patterns as exact
    # module names (what PEFT will apply) and no local path in the metadata, whatever the original held.
    patch.metadata = public_metadata(patch.metadata)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        ops = [CommitOperationAdd(name, str(path)) for name, path in write_published(patch, Path(folder))]
        ops.append(CommitOperationAdd("README.md", model_card(patch, repo_id, image_name, report).encode()))
        if image:
            ops.append(CommitOperationAdd(image_name, str(image)))
        created = False
        try:
            created = _create_repo(api, repo_id, private)
            info = api.create_commit(repo_id, ops,
                                     commit_message=commit_message or f"Forget patch: {one_line(patch.concept)}")
        except BaseException as err:  # Ctrl-C too: a repo this push created must not stay behind empty
            if created:
                with contextlib.suppress(Exception):
                    api.delete_repo(repo_id)
            if isinstance(err, e.HfHubHTTPError):
                raise PatchforgeError(f"push to '{repo_id}' failed ({str(err).splitlines()[0][:120]}): check the "
                                      f"repo id and that your token may write to it") from None
            raise
    return info.commit_url


def _create_repo(api, repo_id: str, private: bool) -> bool:
    """Create `repo_id` unless it exists; True when this call created it."""
    from huggingface_hub import errors as e
    try:
        api.create_repo(repo_id, private=private)
        return True
    except e.HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 409:  # it exists: push adds a commit
            return False
        raise


def _read_report(path: Path) -> dict | None:
    try:
        if path.is_file() and path.stat().st_size < 16 << 20:
            report = json.loads(path.read_text())
            return report if isinstance(report, dict) else None
    except (OSError, ValueError, RecursionError):
        pass
    return None


def pull_patch(repo_id: str, *, revision: str | None = None, weight_name: str | None = None,
               subfolder: str | None = None, token: str | None = None) -> Path:
    """Download a patch into the Hub cache (for later offline loads) and check it reads; returns the path."""
    return _pull(repo_id, revision=revision, weight_name=weight_name, subfolder=subfolder, token=token).path


def _pull(repo_id: str, *, revision=None, weight_name=None, subfolder=None, token=None) -> Patch:
    check_repo_id(repo_id)
    for value, what in ((revision, "revision"), (weight_name, "weight_name"), (subfolder, "subfolder")):
        check_relative(value, what)
    path = _download(repo_id, weight_name or DEFAULT_WEIGHT_NAME, revision=revision, subfolder=subfolder, token=token)
    return read_patch(path)  # read once: the caller gets the checked patch, not a path to read again


def run_push(args) -> int:
    print(push_patch(args.patch, args.repo_id, private=args.private, image=args.image))
    return 0


def run_pull(args) -> int:
    patch = _pull(args.repo_id, revision=args.revision, weight_name=args.weight_name)
    print(f"{args.repo_id}: forget '{one_line(patch.concept)}' ({one_line(patch.method)}) for "
          f"{one_line(patch.metadata.get(K_BASE_ID, '?'))} -> {patch.path}")
    return 0
