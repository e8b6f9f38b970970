"""Which way does a DiT read a concept: from the prompt's tokens (joint attention) or from its pooled vector
(the projection into every block's modulation)? And which way does an attack bring an erased one back?

    python benchmarks/bench_pooled_channel.py --concepts object:star color:red identity:kiko style:stripes
    python benchmarks/bench_pooled_channel.py --concepts object:star --patch star.safetensors

Without --patch: each concept's first 8 training prompts and their anchors ("a photo of a star" / "a photo
of a circle") are generated with every mix of tokens and pooled vector (target/target, target tokens with
the anchor's pooled vector, anchor tokens with the target's pooled vector, anchor/anchor), 3 seeds each,
and the judge reports the concept's rate. With --patch: the patch is loaded, UnlearnDiffAtk runs at its
published budget on the concept's 8 attack prompts, and the attacked prompts are generated with the
attack's tokens and pooled vector, each with the plain prompt's other half, 2 seeds each.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("PATCHFORGE_CACHE", tempfile.mkdtemp(prefix="pf_channel_"))


def rate(judge, images, concept: str) -> float:
    hits = judge.detect(images, concept)
    return sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="patchforge/toy-sd3")
    ap.add_argument("--concepts", nargs="+", default=["object:star"])
    ap.add_argument("--patch", default=None, help="a forget patch: measure the attack's channel against it")
    args = ap.parse_args()

    import torch

    from patchforge.backbones import for_pipe
    from patchforge.core import worlds
    from patchforge.core.concepts import resolve
    from patchforge.core.pipeline_loading import load_pipeline
    from patchforge.eval.attacks.unlearndiff import target_latents
    from patchforge.eval.evaluation import default_judge
    from patchforge.io.loading import load_forget_patch
    from patchforge.pipeline.sampling import generate
    from patchforge.pipeline.soft_tokens import unlearndiff_attack

    torch.set_num_threads(1)
    pipe, judge = load_pipeline(args.model, device="cpu"), default_judge(args.model)
    backbone, world = for_pipe(pipe), worlds.for_model(args.model)
    if args.patch:
        load_forget_patch(pipe, args.patch)
    print("| concept | tokens / pooled | concept rate | images |\n|---|---|---|---|")
    for concept in args.concepts:
        spec = resolve(concept, world_name=world.name if world else None)
        seeds = [1000, 1001] if args.patch else [1000, 1001, 1002]
        if args.patch:
            prompts = world.attack_prompts(spec.name, 8)
            latents = target_latents(pipe, prompts, 1, 0, "base")
            soft = unlearndiff_attack(pipe, prompts, latents, steps=40, n_tokens=5, lr=0.01, seed=0)
            rep = [p for p in prompts for _ in seeds]
            with torch.no_grad():
                a = soft.encode(rep, [i for i in range(len(prompts)) for _ in seeds])
                b = backbone.encode(rep, "cpu")
            names = ("attacked", "plain")
        else:
            rep = [p for p in spec.target[:8] for _ in seeds]
            with torch.no_grad():
                a = backbone.encode(rep, "cpu")
                b = backbone.encode([p for p in spec.anchor[:8] for _ in seeds], "cpu")
            names = ("target", "anchor")
        for (tn, tokens), (pn, pooled) in [((x, u), (y, v)) for x, u in zip(names, (a, b)) for y, v in
                                           zip(names, (a, b))]:
            images = generate(pipe, rep, seeds * (len(rep) // len(seeds)), prompt_embeds=tokens.emb,
                              pooled_embeds=pooled.pooled)
            print(f"| {concept} | {tn} / {pn} | {rate(judge, images, spec.name):.0%} | {len(images)} |", flush=True)


if __name__ == "__main__":
    main()
