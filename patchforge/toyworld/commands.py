"""`patchforge toy ...`: rebuild the embedded default, and measure it."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..core.atomic import write_text
from ..core.pipeline_loading import TOY_MODEL_DIR, TOY_SD3_DIR


def _configs() -> dict:
    """--family -> its build config class (dataclass fields are the flags of `toy train`)."""
    from .build import ToyBuildConfig
    from .build_sd3 import ToyDiTBuildConfig

    return {"sd": ToyBuildConfig, "sd3": ToyDiTBuildConfig}


# extra argparse settings for some build-config fields
TRAIN_FLAGS = {"world": {"choices": ["v1", "v2"],
                         "help": "v1: the shipped world; v2: the harder world of scenes (docs/toy-model.md)"},
               "checkpoint_every": {"help": "UNet steps between resumable checkpoints in OUT/checkpoints (0: none)"},
               "unet_steps": {"help": "--world v2's default: 5500"},
               "steps": {"help": "--world v2's default: 6500"},
               "heads": {"help": "--world v2's default: 4"},
               "base": {"help": "the UNet toy whose VAE, text encoder and judges a DiT build reuses (world v1 "
                                "default: the shipped one; world v2 default: none, the build trains its own)"}}


def register(sub) -> None:
    from .build import ToyBuildConfig

    toy = sub.add_parser("toy", help="the embedded toy text-to-image world: rebuild or measure it")
    toy_sub = toy.add_subparsers(dest="toy_verb", metavar="TOY_VERB")
    train = toy_sub.add_parser("train",
                               help="rebuild a toy model from a seed: --family sd (UNet, with the judges; CPU: "
                                    "~70 min on 2 cores) or sd3 (a diffusion transformer: on the UNet toy's VAE and "
                                    "text encoder for world v1, with its own for world v2)")
    train.add_argument("--family", choices=sorted(_configs()), default="sd",
                       help="sd: the UNet toy (patchforge/toy-sd); sd3: the SD3-layout DiT toy (patchforge/toy-sd3)")
    train.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default: the shipped one, {TOY_MODEL_DIR} or {TOY_SD3_DIR})")
    declared = {}
    for family, config in _configs().items():
        for f in fields(config):
            if f.name in declared:
                declared[f.name][1].append(family)
                continue
            declared[f.name] = (f, [family])
    for name, (f, families) in declared.items():
        # default None: each family's own default applies; a flag another family owns is an error
        extra = dict(TRAIN_FLAGS.get(name, {}))
        own_help = extra.pop("help", "")
        train.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=None, **extra,
                           help=(own_help + "; " if own_help else "") + f"({', '.join(families)}) default: "
                                + ", ".join(f"{fam} {getattr(_configs()[fam], name)!r}" for fam in families))
    train.add_argument("--resume", action="store_true",
                       help="(sd) continue an interrupted build of --out from its last checkpoint (bit-exactly; "
                            "a fresh build when there is none; the sd3 build always resumes from its checkpoint)")
    train.set_defaults(func=_train)
    judges = toy_sub.add_parser("judges",
                                help="retrain only the judges of a built toy model (uses its VAE; same result as "
                                     "the judge stage of `toy train`)")
    judges.add_argument("--out", type=Path, default=TOY_MODEL_DIR, help="the toy model folder whose judges to rebuild")
    judges.add_argument("--seed", type=int, default=ToyBuildConfig.seed)
    judges.add_argument("--judge-steps", type=int, default=ToyBuildConfig.judge_steps)
    judges.add_argument("--batch-size", type=int, default=ToyBuildConfig.batch_size)
    judges.set_defaults(func=_judges)
    report = toy_sub.add_parser("report",
                                help="judge accuracy and base-model concept rates against the quality bars in "
                                     "docs/toy-model.md")
    report.add_argument("--model", default=None)
    report.add_argument("--seeds", type=int, default=8, help="generations per prompt set")
    report.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    report.add_argument("--grid", type=Path, default=None, help="also write a concepts x seeds picture here")
    report.add_argument("--world-grid", type=Path, default=None,
                        help="also write a picture of real renders, a row per concept")
    report.set_defaults(func=_report)
    toy.set_defaults(func=lambda args: toy.print_help() or 0)


def _train(args) -> int:
    from ..errors import PatchforgeError

    config = _configs()[args.family]
    own = {f.name for f in fields(config)}
    foreign = [n for c in _configs().values() for n in (f.name for f in fields(c))
               if n not in own and getattr(args, n, None) is not None]
    if foreign:
        raise PatchforgeError(f"--{foreign[0].replace('_', '-')} is no option of `toy train --family {args.family}`")
    given = {n: getattr(args, n) for n in own if getattr(args, n) is not None}
    if args.family == "sd":
        from .build import WORLD_DEFAULTS
    else:
        from .build_sd3 import WORLD_DEFAULTS
    world = given.get("world", "v1")
    if world != "v1" and args.out is None:  # the default folder holds the shipped v1 model
        raise PatchforgeError(f"a world {world} build needs --out: the default folder holds the shipped v1 model")
    given = {**WORLD_DEFAULTS.get(world, {}), **given}
    cfg = config(**given)
    if args.family == "sd3":
        from .build_sd3 import build_toy_dit

        out = args.out or TOY_SD3_DIR
        report = build_toy_dit(out, cfg)
        params = report["parameters"]["transformer"] / 1e6
        took = ("in an unrecorded time (resumed from a checkpoint that did not record it)" if report["total_s"] is None
                else f"in {report['total_s'] / 60:.1f} min ({report['total_cpu_s'] / 60:.1f} CPU-min)")
        print(f"DiT toy written to {out / 'pipeline'} {took}; transformer {params:.2f} M parameters; "
              f"measure it with `patchforge toy report --model {out / 'pipeline'}`")
        return 0
    from .build import build_toy_model

    args.out = args.out or TOY_MODEL_DIR
    report = build_toy_model(args.out, cfg, resume=args.resume)
    print(f"toy model written to {args.out} in {report['total_s'] / 60:.1f} min; judge accuracy on held-out "
          f"real images: {_accuracy_text(report['judge_accuracy_real'], report.get('identity_accuracy_by_art', {}))}")
    return 0


def _accuracy_text(acc: dict, by_art: dict) -> str:
    """The judges' accuracy per kind, then the identity judge's per art style (world v2)."""
    return (", ".join(f"{k} {v:.1%}" for k, v in acc.items())
            + "".join(f"; identity judge in art style {a}: {v:.1%}" for a, v in by_art.items()))


def _judges(args) -> int:
    from diffusers import AutoencoderKL

    from ..errors import PatchforgeError
    from .build import ToyBuildConfig, build_judges

    if not (args.out / "pipeline" / "vae").is_dir():
        raise PatchforgeError(f"{args.out} is not a toy model folder (no pipeline/vae in it); "
                              "build one with `patchforge toy train`")
    vae = AutoencoderKL.from_pretrained(args.out / "pipeline" / "vae").eval().requires_grad_(False)
    report_path = args.out / "build_report.json"
    built = json.loads(report_path.read_text())["config"] if report_path.exists() else {}
    cfg = ToyBuildConfig(seed=args.seed, judge_steps=args.judge_steps, batch_size=args.batch_size,
                         world=built.get("world", "v1"))  # a v2 model gets v2 judges
    seconds, acc, by_art = build_judges(args.out, vae, cfg)
    if report_path.exists():  # keep the build report true to what is on disk
        report = json.loads(report_path.read_text())
        report["config"]["judge_steps"] = args.judge_steps
        report["stages"]["judges_s"], report["judge_accuracy_real"] = seconds, acc
        if by_art:
            report["identity_accuracy_by_art"] = by_art
        report["total_s"] = round(sum(report["stages"].values()), 1)
        write_text(report_path, json.dumps(report, indent=2))
    print(f"judges written to {args.out / 'judges.safetensors'} in {seconds:.0f} s; accuracy on held-out real images: "
          + _accuracy_text(acc, by_art))
    return 0


def _report(args) -> int:
    from ..core.pipeline_loading import load_pipeline
    from .measure import base_model_report, concept_grid, format_report, world_grid

    if args.world_grid:
        world_grid(args.world_grid)
        print(f"wrote {args.world_grid}")
    if args.grid:
        concept_grid(load_pipeline(args.model, device="cpu"), args.grid)
        print(f"wrote {args.grid}")
    numbers = base_model_report(args.model, seeds=args.seeds)
    print(format_report(numbers))
    if args.json:
        write_text(args.json, json.dumps(numbers, indent=2))
    return 0
