#!/usr/bin/env bash
# Rebuild the example patches in patches/ and their eval reports, exactly as documented in
# patches/README.md: one default (fmn) patch per toy concept kind, on the embedded (v1) model, then on
# the world-v2 model (patches/toy-v2/). `example_patches.sh v1` or `v2` remakes one set.
set -euo pipefail
cd "$(dirname "$0")/.."
PF=${PF:-.venv/bin/patchforge}
WHICH=${1:-all}
if [[ $WHICH == all || $WHICH == v1 ]]; then
  for concept in style:stripes object:star color:red identity:kiko; do
    out="patches/${concept/:/-}.fmn.safetensors"
    $PF train --concept "$concept" --out "$out"
    $PF eval "$out" --seeds 8   # 8 seeds x 6 prompts = 48 images per set: one image is ~2 points
  done
fi
if [[ $WHICH == all || $WHICH == v2 ]]; then
  for concept in style:stripes object:star color:red identity:kiko implicit:bare; do
    out="patches/toy-v2/${concept/:/-}.fmn.safetensors"
    $PF train --model models/toy-v2/pipeline --concept "$concept" --out "$out"
    $PF eval "$out" --model models/toy-v2/pipeline --seeds 4   # 24 images per set: one image is ~4 points
  done
fi
