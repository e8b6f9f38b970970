"""Many concepts in one patch on the toy model: the scaling table behind docs/methods.md ("Many concepts").

    python benchmarks/bench_lists.py [--candidates uce uce-plain] [--lists 1 4 8 16 abo:identity abo:color]
        [--seeds 2] [--n 6] [--eval-from 8] [--json benchmarks/lists.json] [--model patchforge/toy-sd3]

For each candidate (a method and its options) and each list, one patch erasing the whole list:
- N = 1, 4, 8, 16: the first N of SCALING (mixed kinds, in turn); abo:<kind>: every concept of that kind
  but one (the world's first, e.g. every identity but Kiko), which must be kept.
- rank, size, and the time from model loaded to patch written (`train_patch` with the pipeline loaded);
- for lists of at least --eval-from concepts, and every all-but-one list, patchforge's evaluation (the toy
  judge, paired with the base on the same seeds): the pooled and worst concept's target rate on training
  prompts / held-out paraphrases, concepts not in the list (neighbours and other kinds, out of sample) and
  compositional prompts as % of base, what replaces the concepts (pooled), and for all-but-one the concept
  left out, on its own training prompts, as % of base.

One model load, one torch thread; every number of the table is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALING = ["identity:kiko", "style:stripes", "object:star", "color:red", "identity:bruno", "style:checker",
           "object:heart", "color:blue", "identity:mira", "style:dots", "object:cross", "color:green",
           "identity:tobi", "style:rings", "object:square", "color:purple"]
CANDIDATES = {  # name -> (method, its options, TrainConfig fields)
    "uce": ("uce", {}, {}),
    "uce-plain": ("uce", {"preserve_anchors": False, "preserve_weight": 1.0}, {}),  # uce's default before 2026-12-07
    "uce-unbalanced": ("uce", {"balance": False}, {}),  # every prompt one row: uce before balance (2026-12-07)
    # SD3 / FLUX: the joint attention's K/V alone, as uce was before it edited the pooled projection (2026-12-07)
    "uce-kv-only": ("uce", {"denoiser_targets": "xattn-kv"}, {}),
    # SD3 / FLUX: the joint K/V and the pooled projection, uce's default from 2026-12-07 to 2026-12-08 (now text-in)
    "uce-kv+pooled": ("uce", {"denoiser_targets": "xattn-kv+pooled"}, {}),
    "uce-twins": ("uce", {"hold_twins": True}, {}),  # each target prompt's neighbour twin kept (2026-12-08)
    "uce-style-away1": ("uce", {"away_by_kind": ""}, {}),  # the full push for styles too, as before (2026-12-07)
    "uce-pw4": ("uce", {"preserve_weight": 4.0}, {}),
    "uce-pw6": ("uce", {"preserve_weight": 6.0}, {}),
    "uce-pw8": ("uce", {"preserve_weight": 8.0}, {}),
    "uce-away0.5": ("uce", {"away": 0.5}, {}),
    "uce-away-by-kind": ("uce", {"away_by_kind": "style=0.5,object=0.5,color=0.5"}, {}),
    "uce-style-away0": ("uce", {"away_by_kind": "style=0"}, {}),
    "uce-aligned": ("uce", {"align": True}, {}),
    "uce-aligned-away2": ("uce", {"align": True, "away": 2.0}, {}),
    "uce-null0.9": ("uce", {"null_space": 0.9}, {}),  # SPEED's null-space constraint on the kept rows
    "uce-null0.99": ("uce", {"null_space": 0.99}, {}),
    "uce-null0.999": ("uce", {"null_space": 0.999}, {}),
    "uce-null0.99-r64": ("uce", {"null_space": 0.99, "max_rank": 64}, {}),  # the projected edit needs more rank
    "uce-r64": ("uce", {"max_rank": 64}, {}),
    "uce-color-away2": ("uce", {"away_by_kind": "color=2"}, {}),  # a harder push off the colours' anchors
    "fmn": ("fmn", {}, {}),
    "fmn-fast": ("fmn", {}, {"fast": True}),  # on the DiT toy: FMNConfig.JOINT_FAST
    "fmn-fast-r32": ("fmn", {}, {"fast": True, "rank": 32}),  # a LoRA wide enough for uce's warm start
}


def pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def of_base(m: dict | None) -> float | None:
    return m["patched"] / m["base"] if m and m.get("n") and m.get("base") else None


def lists_for(names: list[str]) -> dict[str, list[str]]:
    from patchforge.toyworld import world

    out = {}
    for name in names:
        if name.startswith("abo:"):
            kind = name.split(":", 1)[1]
            every = [c for c in world.concepts_of(kind) if c != world.NONE]
            out[name] = [f"{kind}:{c}" for c in every[1:]]
        else:
            out[name] = SCALING[:int(name)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", nargs="+", default=["uce", "uce-plain"], choices=list(CANDIDATES))
    ap.add_argument("--lists", nargs="+", default=["1", "4", "8", "16", "abo:identity", "abo:style", "abo:object",
                                                    "abo:color"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n", type=int, default=6, help="prompts per set")
    ap.add_argument("--eval-from", type=int, default=8, help="evaluate mixed lists of at least this many concepts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None, help="default: the embedded toy; patchforge/toy-sd3: the DiT toy")
    args = ap.parse_args()
    os.environ["PATCHFORGE_CACHE"] = tempfile.mkdtemp(prefix="bench_lists_cache_")  # a method pays its references
    import torch

    torch.set_num_threads(1)
    from patchforge.core.pipeline_loading import load_pipeline
    from patchforge.eval.evaluation import default_judge, evaluate
    from patchforge.eval.rows import load_patch, run_rows, unload_patch
    from patchforge.toyworld import world
    from patchforge.toyworld.plugin import ToyWorld
    from patchforge.train.loop import TrainConfig, train_patch

    pipe, judge = load_pipeline(args.model, device="cpu"), default_judge(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_lists_"))
    lists = lists_for(args.lists)
    rows, patches = [], {}
    for cand in args.candidates:
        method, options, train = CANDIDATES[cand]
        for name, concepts in lists.items():
            cfg = TrainConfig(method=method, progress=False, options=dict(options), **train)
            t0 = time.perf_counter()
            out = work / f"{cand}.{name.replace(':', '-')}.safetensors"
            path, s = train_patch(concepts, method, args.model, cfg, out=out, pipe=pipe)
            wall = time.perf_counter() - t0
            rows.append({"candidate": cand, "list": name, "n": len(concepts), "rank": s["rank"],
                         "kib": round(s["bytes"] / 1024), "seconds": round(wall, 2)})
            if name.startswith("abo:") or len(concepts) >= args.eval_from:
                patches[(cand, name)] = (path, len(rows) - 1)
            print(f"trained {cand} {name}: {len(concepts)} concepts, {wall:.2f} s", file=sys.stderr, flush=True)
    keys = list(patches)
    reports = evaluate([patches[k][0] for k in keys], args.model, seeds=args.seeds, n=args.n, judge=judge, pipe=pipe,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))["patches"]
    toy = ToyWorld()
    for key, rep in zip(keys, reports):
        row, me, per = rows[patches[key][1]], rep["metrics"], rep.get("by_concept", {})
        worst = max(per, key=lambda c: (per[c]["efficacy"]["patched"], per[c]["generality"]["patched"]), default=None)
        row.update({"pooled": [me["efficacy"]["patched"], me["generality"]["patched"]],
                    "worst": worst and [worst, per[worst]["efficacy"]["patched"], per[worst]["generality"]["patched"]],
                    "neighbours": of_base(me.get("specificity.neighbours")),
                    "other_kinds": of_base(me.get("specificity.other_kinds")),
                    "compositional": of_base(me.get("specificity.compositional")),
                    "replacement": {c: me.get(f"replacement.{c}", {}).get("patched") for c in ("neutral", "other",
                                                                                                "absent")},
                    "per_concept": {c: [m["efficacy"]["patched"], m["generality"]["patched"]] for c, m in per.items()}})
        if key[1].startswith("abo:"):  # the one concept of the kind left out: on its own training prompts
            kept = world.concepts_of(key[1].split(":", 1)[1])[0]
            probe = [r for r in toy.eval_rows([kept], args.n) if r.set == "efficacy"]
            base = run_rows(pipe, judge, probe, args.seeds).scores["hit"].mean()
            name, _ = load_patch(pipe, patches[key][0])
            try:
                patched = run_rows(pipe, judge, probe, args.seeds).scores["hit"].mean()
            finally:
                unload_patch(pipe, name)
            row["left_out"] = [kept, float(base), float(patched)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seeds": args.seeds,
                                               "prompts": args.n, "model": args.model or "embedded toy",
                                               "rows": rows}, indent=1))


def table(rows: list[dict]) -> str:
    lines = ["| candidate | list | N | rank | KiB | loaded → written (s) | pooled (train / held-out) | worst concept | "
             "not listed: neighbours, % of base | other kinds, % of base | compositional, % of base | "
             "replaced by neutral / other / nothing | left out, kept (base) |", "|---" * 13 + "|"]
    for r in rows:
        if "pooled" not in r:
            lines.append(f"| {r['candidate']} | {r['list']} | {r['n']} | {r['rank']} | {r['kib']} | {r['seconds']} |"
                         + " |" * 7)
            continue
        w = r["worst"]
        rep = " / ".join(pct(r["replacement"][c]) for c in ("neutral", "other", "absent"))
        left = (f"{r['left_out'][0]} {pct(r['left_out'][2])} ({pct(r['left_out'][1])})" if r.get("left_out") else "")
        worst = f"{w[0]} {pct(w[1])} / {pct(w[2])}" if w else "–"
        lines.append(f"| {r['candidate']} | {r['list']} | {r['n']} | {r['rank']} | {r['kib']} | {r['seconds']} | "
                     f"{pct(r['pooled'][0])} / {pct(r['pooled'][1])} | {worst} | {pct(r['neighbours'])} | "
                     f"{pct(r['other_kinds'])} | {pct(r['compositional'])} | {rep} | {left} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
