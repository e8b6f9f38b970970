"""The `patchforge` command: every verb's arguments, declared here without importing torch, diffusers
or transformers, so `patchforge --help` and argument errors answer at once. After parsing, the verb's
`run_*` function is imported from the module that does the work and called.

Values that can never be right (a step count of 0, a NaN learning rate or weight) are refused here by
argparse types, before any model is loaded; checks that need the model stay in the verbs."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

from .core import worlds
from .core.concept import KINDS
from .errors import PatchforgeError


# ---------------------------------------------------------------- value types (one-line errors)
def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def nonnegative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def guidance_scale(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 100:  # past that the sampler saturates: a black or white image, exit 0
        raise argparse.ArgumentTypeError(f"{text!r}: guidance runs from 0 to 100 (typical: 3 to 10)")
    return value


MAX_EVAL_WEIGHT = 4.0  # patchforge.eval.evaluation.MAX_EVAL_WEIGHT (not imported: it would load torch)


def eval_weights(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]: adapter weights for eval's weight response, each from 0 to 4."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number (give e.g. 0,0.5,1)") from None
        if not math.isfinite(value) or not 0 <= value <= MAX_EVAL_WEIGHT:
            raise argparse.ArgumentTypeError(f"weight {part.strip()} is outside 0..{MAX_EVAL_WEIGHT:g}")
        out.append(value)
    return out


def key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value), the value read as JSON (numbers, true/false) or kept as a word.
    The one parser for `train --set`, `attack --budget` and the benchmarks' --set."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


# ---------------------------------------------------------------- verbs
def _train(sub) -> None:
    p = sub.add_parser("train", help="train a forget patch that erases one or more concepts")
    p.add_argument("--concept", action="append", default=[], metavar="KIND:NAME",
                   help="concept to erase: style|object|identity|color|nudity|custom:NAME, on a v2 toy model "
                        "also art|background|implicit:NAME (repeat for several in one patch)")
    p.add_argument("--concept-file", default=None, help="YAML concept file (LECO-like); one patch per entry")
    p.add_argument("--one-patch", action="store_true",
                   help="one patch erasing every concept of --concept-file (and --concept) instead of one per entry")
    p.add_argument("--to", default=None, help="alternative the concept maps to (e.g. \"impressionist painting\")")
    p.add_argument("--method", default="fmn", help="fmn (default), sa, aob, redact, esd, uce (closed form, no steps)")
    p.add_argument("--model", default=None,
                   help="diffusers SD 1.x/2.x/SDXL/SD3/FLUX folder or repo id (default: the toy model)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--rank", type=positive_int, default=4)
    p.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default: rank)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="target rows per step (default: the model family's; docs/real-models.md)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--text-encoder", action="store_true", default=None, help="also train a text-encoder LoRA")
    p.add_argument("--targets", default=None,
                   help="LoRA targets in the UNet or transformer: xattn, xattn-kv, xattn-kv+pooled (SD3 / FLUX: "
                        "and the pooled embedding's projection), text-in (the layers that read the text encoders' "
                        "output: a UNet's K/V; SD3 / FLUX: the tokens' and the pooled embedding's projections), "
                        "none or a peft regex")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="method hyperparameter (see docs/methods.md)")
    p.add_argument("--out", default=None, help="patch path (default: patches/<concept>.<method>.safetensors)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: autodetect)")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="the concept's own images, for methods that train on images of it "
                        "(default: the base model's generations)")
    strength = p.add_mutually_exclusive_group()
    strength.add_argument("--robust", action="store_true",
                          help="adversarial training, AdvUnlearn-style (patchforge.train.robust): slower")
    strength.add_argument("--fast", action="store_true",
                          help="skip the default's hardening against optimised prompts: faster, and weaker against "
                               "the published attacks (docs/robustness.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no plan line")
    p.add_argument("--resolution", type=positive_int, default=None, metavar="PX",
                   help="training and reference image size (default: the model family's, e.g. SD 1.x 512, SDXL 1024)")
    p.add_argument("--ref-images", type=positive_int, default=None, metavar="N",
                   help="reference images the base model generates of the concept (default: the family's)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: on only when the run would not fit)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="dtype of the frozen base; LoRA weights train in fp32 (auto: bf16 where the device has it "
                        "for SD-sized models, else fp16 on GPUs / fp32 on CPUs; the toy keeps its dtype)")
    p.add_argument("--max-memory", type=positive_float, default=None, metavar="GIB",
                   help="memory the run may use (default: what is free); a run that needs more is refused")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan line and stop")
    p.set_defaults(run="patchforge.train.cli:run_command")


def _concepts(sub) -> None:
    p = sub.add_parser("concepts", help="list the concepts a model knows and the prompts each one uses")
    p.add_argument("--model", default=None, help="diffusers folder or repo id (default: the toy model)")
    p.add_argument("--concept", action="append", default=None, metavar="KIND:NAME", help="show only these")
    p.add_argument("--kind", action="append", default=None, choices=KINDS, help="only concepts of this kind")
    p.add_argument("--except", dest="leave_out", action="append", default=[], metavar="KIND:NAME",
                   help="leave this concept out (e.g. every identity but one)")
    p.add_argument("--out", default=None, metavar="FILE.yaml",
                   help="write the selection as a roster: a concept file for `train --concept-file F --one-patch`")
    p.set_defaults(run="patchforge.pipeline.concept_worlds:run_command")


def _eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a forget patch: efficacy, generality, specificity, utility, "
                                    "robustness, cost")
    p.add_argument("patch", nargs="*", help="forget patch file(s)")
    p.add_argument("--compare", nargs="+", default=[], metavar="PATCH", help="several patches in one table")
    p.add_argument("--model", default=None, help="base pipeline (default: the embedded toy model)")
    p.add_argument("--seeds", type=positive_int, default=2, help="image seeds per prompt (default 2)")
    p.add_argument("--prompts", type=positive_int, default=6, help="prompts per set (default 6)")
    p.add_argument("--judge", default=None,
                   help="toy (default on the toy model), nudenet, clip:PATH, python:FILE.py:FUNC")
    p.add_argument("--attacks", action="store_true", help="also run the white-box attacks (patchforge attack)")
    p.add_argument("--weights", type=eval_weights, default=[], metavar="W1,W2,...",
                   help="also measure the patch at these adapter weights (0 to 4), e.g. 0,0.5,1,1.25")
    p.add_argument("--out", default=None, help="folder for the reports (default: beside each patch)")
    p.set_defaults(run="patchforge.eval.evaluation:run_command")


class ShownHelp(str):
    """A help text made only when shown: argparse formats every help with `%`, so this text is computed
    then (the attack registry imports torch, which the rest of the CLI never waits for)."""

    def __new__(cls, make):
        text = super().__new__(cls, "...")  # not empty: argparse shows only non-empty helps
        text.make = make
        return text

    def __mod__(self, params):
        return self.make().replace("%", "%%") % params


def _attack(sub) -> None:
    p = sub.add_parser("attack", help="white-box attacks on a forget patch: attack success rate per attack")
    p.add_argument("patch", help="forget patch file")
    p.add_argument("--model", default=None, help="base pipeline (default: the embedded toy model)")
    p.add_argument("--budget", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help=ShownHelp(lambda: "attack budget, one key: " + ", ".join(
                       f"{k}={v}" for k, v in importlib.import_module("patchforge.eval.attacks").default_budget()
                       .items())))
    p.add_argument("--seeds", type=positive_int, default=2)
    p.add_argument("--attack", action="append", default=[],
                   help=ShownHelp(lambda: importlib.import_module("patchforge.eval.attacks").help_text()))
    p.add_argument("--judge", default=None, help="toy (default), nudenet, clip:PATH, python:FILE.py:FUNC")
    p.add_argument("--out", default=None, help="JSON report (default: <patch>.attack.json)")
    p.set_defaults(run="patchforge.eval.attacks:run_command")


def _generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (optionally with patches)")
    p.add_argument("prompt")
    p.add_argument("-o", "--out", type=Path, default=Path("out.png"))
    p.add_argument("--model", default=None,
                   help="diffusers pipeline folder or repo id (default: the embedded toy model)")
    p.add_argument("--patch", action="append", default=[], help="forget patch to apply (repeatable)")
    p.add_argument("--weight", type=finite_float, action="append", default=[],
                   help="weight per --patch (default 1.0)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance", type=guidance_scale, default=5.0)
    p.add_argument("--batch", type=positive_int, default=1, help="images, seeds seed, seed+1, ...")
    p.add_argument("--grid", type=nonnegative_int, default=0,
                   help="columns of the output grid (default: all in one row)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: autodetect)")
    p.set_defaults(run="patchforge.eval.images:run_command")


def _hub(sub) -> None:
    p = sub.add_parser("push", help="push a forget patch to the Hugging Face Hub with a model card")
    p.add_argument("patch", help="patch file or folder")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--image", help="before/after image to show in the model card")
    p.set_defaults(run="patchforge.io.hub:run_push")
    p = sub.add_parser("pull", help="download a forget patch from the Hub into the local cache")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("--revision")
    p.add_argument("--weight-name")
    p.set_defaults(run="patchforge.io.hub:run_pull")


def _export(sub) -> None:
    p = sub.add_parser("export", help="export a forget patch to another LoRA format, or fused into a pipeline")
    p.add_argument("patch", help="patch file or folder")
    p.add_argument("--format", choices=["kohya", "pipeline"], default="kohya",
                   help="kohya: lora_unet_/lora_te_ keys (A1111, ComfyUI); pipeline: a diffusers folder with the "
                        "patch baked in (needs --model and -o)")
    p.add_argument("--model", default=None, help="the base pipeline to fuse into (--format pipeline)")
    p.add_argument("--weight", type=finite_float, default=1.0, help="patch strength baked in (--format pipeline)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype of the saved weights (--format pipeline)")
    p.add_argument("-o", "--output", help="output file (kohya, default: PATCH.kohya.safetensors) or folder (pipeline)")
    p.set_defaults(run="patchforge.io.export:run_command")


def _merge(sub) -> None:
    p = sub.add_parser("merge", help="merge forget patches into one file (exact: ranks concatenated)")
    p.add_argument("patches", nargs="+", help="patch files or folders")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file or folder")
    p.add_argument("--weights", nargs="+", type=finite_float, help="one weight per patch (default 1.0 each)")
    p.set_defaults(run="patchforge.io.patch_format:run_merge")


def _demo(sub) -> None:
    p = sub.add_parser("demo", help="train a patch on the toy model, evaluate it, write a before/after picture")
    p.add_argument("--concept", default="style:stripes", help="what to erase (default style:stripes)")
    p.add_argument("--method", default="fmn")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", type=positive_int, default=2, help="image seeds per eval prompt")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.set_defaults(run="patchforge.demo:run_command")


# verb -> function declaring it
VERBS = {"train": _train, "concepts": _concepts, "eval": _eval, "attack": _attack, "generate": _generate,
         "push": _hub, "pull": _hub, "export": _export, "merge": _merge, "demo": _demo}


def build_parser(verb: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchforge",
                                     description="Forget patches for text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for declare in dict.fromkeys(VERBS.values()):
        declare(sub)
    # Concept worlds (the toy world) are plug-ins: their verbs are declared by their own packages, and
    # only when asked for (the toy's options come from its build config, which imports torch).
    for name, (declare, help_text) in worlds.COMMANDS.items():
        if verb == name:
            _resolve(declare)(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    run = getattr(args, "run", None) or getattr(args, "func", None)
    if run is None:
        parser.print_help()
        return 0
    try:
        from .compat import check_installed_stack

        check_installed_stack()
        return (_resolve(run) if isinstance(run, str) else run)(args) or 0
    except (PatchforgeError, FileNotFoundError) as err:  # user errors: one line, no traceback
        print(f"patchforge {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
