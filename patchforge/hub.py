"""Forget patches on the Hugging Face Hub: resolve a source to a local file, push with a model card,
pull into the local cache. Everything goes through huggingface_hub's own client (HF_ENDPOINT,
HF_HUB_OFFLINE, HF_TOKEN and the cache work as users expect)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import PatchforgeError
from .patch_format import (DEFAULT_WEIGHT_NAME, K_BASE_FAMILY, K_BASE_ID, K_CONCEPT, K_EVAL, K_HPARAMS, K_METHOD,
                           K_SECONDS, K_DEVICE, Patch, read_patch)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IMAGE_NAMES = ("before_after.png", "before_after.jpg")  # shown in the card when found beside the patch


def resolve_patch_file(src, *, weight_name: str | None = None, subfolder: str | None = None,
                       revision: str | None = None, token: str | None = None, cache_dir: str | None = None) -> Path:
    """A local patch file for `src`: a file, a folder (weight_name or the default name inside), or a
    Hub repo id fetched through the Hub cache (works offline once cached)."""
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
        raise PatchforgeError(f"no patch at '{src}': give a .safetensors file, a folder holding one, or a Hub repo "
                              f"id (owner/name)")
    return _download(str(src), weight_name or DEFAULT_WEIGHT_NAME, subfolder=subfolder, revision=revision,
                     token=token, cache_dir=cache_dir)


def _download(repo_id: str, filename: str, **kwargs) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as e

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="model", **kwargs))
    except e.RepositoryNotFoundError:
        raise PatchforgeError(f"no Hub repo '{repo_id}' (or it is private and no token was given): check the id, "
                              f"or log in with `hf auth login`") from None
    except e.RevisionNotFoundError:
        raise PatchforgeError(f"Hub repo '{repo_id}' has no revision '{kwargs.get('revision')}': check the "
                              f"branch, tag or commit") from None
    except e.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise PatchforgeError(f"'{repo_id}' is not in the local Hub cache and the Hub cannot be reached (offline?): "
                              f"run `patchforge pull {repo_id}` while online") from None
    except e.EntryNotFoundError:
        raise PatchforgeError(f"Hub repo '{repo_id}' has no file '{filename}': pass weight_name= (and subfolder=) "
                              f"naming the patch file") from None
    except e.HfHubHTTPError as err:
        raise PatchforgeError(f"the Hub refused '{repo_id}' ({str(err).splitlines()[0][:120]}): check the id and "
                              f"your token") from None


# ----------------------------------------------------------------------------- model card

def model_card(patch: Patch, repo_id: str, image: str | None = None) -> str:
    """README.md in Hub conventions for LoRA repos, so the Hub links the base model and shows the
    repo as an adapter of it."""
    md = patch.metadata
    base, concept, method = md.get(K_BASE_ID, "unknown"), md.get(K_CONCEPT, "?"), md.get(K_METHOD, "?")
    tags = ["lora", "concept-erasure", "patchforge", "text-to-image", "diffusers", "stable-diffusion"]
    if md.get(K_BASE_FAMILY, "").startswith("sdxl"):
        tags.append("stable-diffusion-xl")
    lines = ["---", "library_name: diffusers", f"base_model: {base}", "base_model_relation: adapter", "tags:"]
    lines += [f"- {t}" for t in tags] + ["license: other", "---", "",
                                         f"# Forget patch: {concept}", "",
                                         f"A patchforge forget patch for [{base}](https://huggingface.co/{base}): a LoRA "
                                         f"adapter that makes the model forget **{concept}**.", "",
                                         "| | |", "|---|---|", f"| Concept | {concept} |", f"| Method | {method} |",
                                         f"| Base model | {base} ({md.get(K_BASE_FAMILY, '?')}) |",
                                         f"| Components | {', '.join(patch.components)} |"]
    if md.get(K_SECONDS):
        lines.append(f"| Training | {float(md[K_SECONDS]):.0f} s on {md.get(K_DEVICE, '?')} |")
    if md.get(K_HPARAMS):
        lines.append(f"| Hyperparameters | `{md[K_HPARAMS]}` |")
    lines += ["", "## Evaluation", ""] + _eval_table(md.get(K_EVAL))
    if image:
        lines += ["", "## Before / after", "", f"![before and after]({image})"]
    lines += ["", "## Use", "", "```python", "import patchforge", "", "patchforge.enable(pipe)  # opt-in, once per pipeline",
              f'pipe.load_forget_patch("{repo_id}", weight=1.0)', "```", "",
              "Plain diffusers also works: `pipe.load_lora_weights(\"" + repo_id + "\")` (no stacking registry).", ""]
    return "\n".join(lines)


def _eval_table(raw: str | None) -> list[str]:
    try:
        summary = json.loads(raw) if raw else None
    except ValueError:
        summary = None
    if not isinstance(summary, dict) or not summary:
        return ["No evaluation was recorded with this patch."]
    rows = [(k, v) for k, v in summary.items()]
    if all(isinstance(v, dict) for _, v in rows):  # {metric: {"before": x, "after": y, ...}}
        cols = list(dict.fromkeys(c for _, v in rows for c in v))
        out = ["| Metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        return out + [f"| {k} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for k, v in rows]
    return ["| Metric | Value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))


# ----------------------------------------------------------------------------- push / pull

def push_patch(patch_path, repo_id: str, *, private: bool = False, token: str | None = None,
               image: str | None = None, commit_message: str | None = None) -> str:
    """Create (or reuse) `repo_id` and commit the patch as pytorch_lora_weights.safetensors with a
    model card and, when given or found beside the patch, a before/after image. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as e

    patch = read_patch(patch_path)  # never publish a file that does not validate
    if not REPO_ID.match(repo_id):
        raise PatchforgeError(f"'{repo_id}' is not a Hub repo id: use owner/name")
    if image is None:
        image = next((str(patch.path.parent / n) for n in IMAGE_NAMES if (patch.path.parent / n).is_file()), None)
    image_name = Path(image).name if image else None
    ops = [CommitOperationAdd(DEFAULT_WEIGHT_NAME, str(patch.path)),
           CommitOperationAdd("README.md", model_card(patch, repo_id, image_name).encode())]
    if image:
        ops.append(CommitOperationAdd(image_name, str(image)))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=commit_message or f"Forget patch: {patch.concept}")
    except e.HfHubHTTPError as err:
        raise PatchforgeError(f"push to '{repo_id}' failed ({str(err).splitlines()[0][:120]}): check the repo id "
                              f"and that your token may write to it") from None
    return info.commit_url


def pull_patch(repo_id: str, *, revision: str | None = None, weight_name: str | None = None,
               subfolder: str | None = None, token: str | None = None) -> Path:
    """Download a patch into the Hub cache (for later offline loads) and check it reads; returns the path."""
    path = _download(repo_id, weight_name or DEFAULT_WEIGHT_NAME, revision=revision, subfolder=subfolder, token=token)
    read_patch(path)
    return path


def run_push(args) -> int:
    print(push_patch(args.patch, args.repo_id, private=args.private, image=args.image))
    return 0


def run_pull(args) -> int:
    path = pull_patch(args.repo_id, revision=args.revision, weight_name=args.weight_name)
    patch = read_patch(path)
    print(f"{args.repo_id}: forget '{patch.concept}' ({patch.method}) for {patch.metadata.get(K_BASE_ID, '?')} -> {path}")
    return 0
