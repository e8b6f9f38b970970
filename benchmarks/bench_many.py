"""Many concepts on the toy model: uce against fmn, many identities at once, and the cost of many patches.

    python benchmarks/bench_many.py [--seeds 2] [--n 6] [--methods uce,fmn] [--skip-loading]

Prints one markdown report with three tables, every number measured in this one run (same machine,
same seeds, one model load):

1. One concept per kind (style, object, colour, identity), uce beside fmn: the target rate on the
   training prompts and on held-out aliases/paraphrases, neighbours and other kinds as % of base
   (out-of-sample: prompts the patch never trained to hold, where there are any), the wall time of
   one patch (`train_patch` with the model loaded and an empty reference cache: from model loaded to
   patch written) and uce/fmn.
2. Every identity of the toy world erased at once (it has 4): one uce patch, one fmn patch, fmn started
   from uce (`warm_start=uce`, at fmn's default steps and at 20), and uce patches made one per identity
   then merged (`merge_patches`, ranks concatenated); each identity's rate on training and held-out
   prompts, the other kinds kept, total wall time.
3. (moved: one patch for N concepts is benchmarks/bench_lists.py's scaling table)
4. 50 patches: load and activate with load_forget_patch against diffusers' own load_lora_weights +
   set_adapters for the same files (benchmarks/bench_loading.py), and the per-image cost of 50
   active patches unfused, fused (fuse_forget_patches) and merged into one patch, against the base.

All evaluation is patchforge.eval.evaluation.evaluate (the toy judge, paired with the base on the same
image seeds). Use OMP_NUM_THREADS=1 on a shared machine; the benchmark sets torch to one thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ONE_PER_KIND = ["style:stripes", "object:star", "color:red", "identity:kiko"]

def pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def flush(lines: list[str]) -> list[str]:
    """Print the tables made so far (a long run keeps what it measured if a later part fails)."""
    print("\n".join(lines), flush=True)
    return []


def train_held(m: dict) -> str:
    """'training / held-out' target rates of a metrics dict (or one concept's entry of by_concept)."""
    return f"{pct(m.get('efficacy', {}).get('patched'))} / {pct(m.get('generality', {}).get('patched'))}"


def kept(m: dict, key: str) -> float | None:
    """Retention as a share of base, on the prompts the patch never trained on (eval's headline)."""
    v = m.get(key)
    return v["patched"] / v["base"] if v and v["n"] and v["base"] else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--methods", default="uce,fmn")
    ap.add_argument("--patches", type=int, default=50, help="patches loaded in table 4")
    ap.add_argument("--images", type=int, default=8, help="images per timing in table 4")
    ap.add_argument("--parts", default="1,2,4", help="which tables to make (1-2 share one evaluation run)")
    args = ap.parse_args(argv)
    os.environ["PATCHFORGE_CACHE"] = tempfile.mkdtemp(prefix="bench_many_cache_")  # fmn pays its references
    import torch

    torch.set_num_threads(1)
    from patchforge.eval.evaluation import evaluate
    from patchforge.io.patch_format import merge_patches, read_patch, write_patch
    from patchforge.core.pipeline_loading import load_pipeline
    from patchforge.train.loop import TrainConfig, train_patch

    t_all = time.time()
    t = time.perf_counter()
    pipe = load_pipeline(None, device="cpu")
    load_s = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="bench_many_"))
    methods = args.methods.split(",")
    def quiet(*_):
        return None

    def train(concepts, method, name, **kw):
        cfg = TrainConfig(method=method, progress=False, **kw)
        t0 = time.perf_counter()
        path, s = train_patch(concepts, method, None, cfg, out=work / f"{name}.{method}.safetensors", pipe=pipe)
        return path, s, time.perf_counter() - t0

    out = [(f"Toy model, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU cores; model load "
           f"{load_s:.1f} s; {args.seeds} image seeds × {args.n} prompts per set; method defaults, training seed 0."),
           ""]
    parts = set(args.parts.split(","))
    if parts & {"1", "2"}:  # ---- 1. one concept per kind, 2. every identity at once
        trained = ({(m, c): train([c], m, c.replace(":", "-")) for m in methods for c in ONE_PER_KIND}
                   if "1" in parts else {})
        print(f"[1/4] trained {len(trained)} patches", file=sys.stderr, flush=True)
        from patchforge.toyworld import world

        ids = [f"identity:{i}" for i in world.IDENTITIES]
        group = {m: train(ids, m, "all-identities") for m in methods} if "2" in parts else {}
        if "2" in parts and {"uce", "fmn"} <= set(methods):  # the combination: fmn's LoRA started from uce's edit
            group["fmn, warm_start=uce"] = train(ids, "fmn", "all-identities-warm", options={"warm_start": "uce"})
            group["fmn, warm_start=uce, 20 steps"] = train(ids, "fmn", "all-identities-warm20", steps=20,
                                                           options={"warm_start": "uce"})
        if "2" in parts and "uce" in methods:
            t0 = time.perf_counter()
            singles = [train([c], "uce", c.replace(":", "-") + "-single") for c in ids]
            merged = write_patch(merge_patches([read_patch(p) for p, _, _ in singles]),
                                 work / "all-identities.uce-merged.safetensors")
            group["uce, one per identity, merged"] = (merged, {"rank": read_patch(merged).lora_configs["unet"]["r"]},
                                                      time.perf_counter() - t0)
        print("[2/4] trained the identity patches", file=sys.stderr, flush=True)
        paths = [v[0] for v in trained.values()] + [v[0] for v in group.values()]
        reports = evaluate(paths, None, seeds=args.seeds, n=args.n, pipe=pipe, progress=quiet)["patches"]
        by_path = {r["patch"]["path"]: r for r in reports}
    if "1" in parts:
        out += ["### One concept per kind", "",
                ("| method | concept | target, training prompts | held-out paraphrases | neighbours, % of base | "
                "other kinds, % of base | rank | wall per patch (s) | uce / fmn |"),
                "|---|---|---|---|---|---|---|---|---|"]
        for (m, c), (path, s, wall) in trained.items():
            me = by_path[str(path)]["metrics"]
            ratio = (f"{wall / trained[('fmn', c)][2]:.3f}×" if m == "uce" and ("fmn", c) in trained else "")
            out.append(f"| {m} | {c} | {pct(me['efficacy']['patched'])} | {pct(me['generality']['patched'])} | "
                       f"{pct(kept(me, 'specificity.neighbours'))} | {pct(kept(me, 'specificity.other_kinds'))} | "
                       f"{s['rank']} | {wall:.2f} | {ratio} |")
        out += ["", ("Base rates: every target 100 % on training and held-out prompts. Neighbours and other kinds: "
                "prompts the patch never trained on (eval draws fresh ones where its canonical prompts are preserve "
                "prompts, e.g. an identity's neighbours). Wall per patch: `train_patch` with the model "
                "loaded and an empty reference cache, from the call to the patch file written."), ""]

    out = flush(out)
    if "2" in parts:
        out += [f"### All {len(ids)} identities at once", "",
                "| patch | " + " | ".join(i.split(':')[1] for i in ids) + " | pooled | "
                "other kinds, % of base | "
                "rank | total wall (s) |", "|---|" + "---|" * (len(ids) + 4)]
        for name, (path, s, wall) in group.items():
            rep = by_path[str(path)]
            cells = [train_held(rep.get("by_concept", {}).get(i.split(':')[1], {})) for i in ids]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {train_held(rep['metrics'])} | "
                       f"{pct(kept(rep['metrics'], 'specificity.other_kinds'))} | {s['rank']} | {wall:.1f} |")
        out += ["", ("Cells: target rate on training prompts / on held-out aliases and paraphrases (base: 100 % / "
                "100 %). The toy world has 4 identities, so all of them are erased and none is left to retain; "
                "other kinds are out-of-sample. Total wall: `train_patch` with the model loaded, from the call to "
                "the patch written; the first fmn row generates the identities' reference images, the later "
                "fmn rows find them in the cache."), ""]
        print("[3/4] evaluated", file=sys.stderr, flush=True)

    out = flush(out)
    if "4" in parts:  # ---- 4. many patches
        out += many_patches(pipe, work, args.patches, args.images)
    print("\n".join(out))
    print(f"\n({(time.time() - t_all) / 60:.1f} min)")
    return 0


def many_patches(pipe, work: Path, n: int, n_images: int) -> list[str]:
    import transformers
    from bench_loading import load_patches, load_plain_loras, make_patches

    from patchforge.io import loading
    from patchforge.eval.evaluation import generate
    from patchforge.io.patch_format import merge_patches, read_patch, write_patch
    from patchforge.core.pipeline_loading import load_pipeline

    transformers.logging.set_verbosity_error()  # diffusers' stacked loads list the other adapters as MISSING
    folder = work / "many"
    folder.mkdir()
    paths = make_patches(pipe, folder, n)
    rounds = []
    for _ in range(3):  # in turns, best of 3 each: the machine's load drifts over minutes
        rounds.append((load_patches(pipe, paths), load_plain_loras(pipe, paths)))
    ours, theirs = min(r[0] for r in rounds), min(r[1] for r in rounds)
    merged = write_patch(merge_patches([read_patch(p) for p in paths]), folder / "merged.safetensors")
    prompts, seeds = ["a red star in stripes style"] * n_images, list(range(n_images))
    # A second pipeline carries the patches; each variant is timed in turns with the bare base, in CPU
    # seconds of this process (one torch thread): other jobs on a shared machine move wall time by
    # more than the few per cent measured here.
    other = load_pipeline(None, device="cpu")

    def cpu_per_image(p) -> float:
        t = time.process_time()
        generate(p, prompts, seeds)
        return (time.process_time() - t) / n_images

    def paired(rounds: int = 5) -> tuple[float, float]:
        generate(other, prompts[:2], seeds[:2])  # warm-up
        base, var = float("inf"), float("inf")
        for _ in range(rounds):
            base, var = min(base, cpu_per_image(pipe)), min(var, cpu_per_image(other))
        return base, var

    rows = []
    for p in paths:
        loading.load_forget_patch(other, p)
    rows.append((f"{n} patches active, unfused", *paired()))
    loading.fuse_forget_patches(other)
    rows.append((f"{n} patches fused (`fuse_forget_patches`)", *paired()))
    loading.unload_forget_patches(other)
    t = time.perf_counter()
    loading.load_forget_patch(other, merged)
    merged_load = time.perf_counter() - t
    rows.append((f"{n} patches merged into one (rank {read_patch(merged).lora_configs['unet']['r']}), unfused",
                 *paired()))
    loading.bake_forget_patches(other)
    rows.append(("the merged patch baked (`bake_forget_patches`: fused, LoRA layers dropped)", *paired()))
    lines = [f"### {n} patches", "",
             "| load and activate | seconds |", "|---|---|",
             f"| {n} × `load_forget_patch` (all active) | {ours:.2f} |",
             f"| {n} × diffusers `load_lora_weights` + `set_adapters` | {theirs:.2f} |",
             f"| ratio | {ours / theirs:.2f}× |",
             f"| ratio in each round | {', '.join(f'{a / b:.2f}×' for a, b in rounds)} |",
             f"| the merged patch, one `load_forget_patch` | {merged_load:.2f} |", "",
             "| inference | base, CPU s / image | with patches, CPU s / image | overhead |", "|---|---|---|---|"]
    lines += [f"| {what} | {b:.4f} | {v:.4f} | {v / b - 1:+.1%} |" for what, b, v in rows]
    lines += ["", (f"Random rank-4 LoRAs on UNet attention and the text encoder (bench_loading.make_patches); "
              f"loading: wall time, the two in turns, best of 3 each; inference: CPU time of the process (one "
              f"torch thread), best of 5 timings of {n_images} images of 20 steps, each variant in turns with the "
              f"bare base on a second pipeline.")]
    return lines


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
