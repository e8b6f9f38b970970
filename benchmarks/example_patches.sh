#!/usr/bin/env bash
# Rebuild the example patches in patches/ and their eval reports, exactly as documented in
# patches/README.md: one default (fmn) patch per toy concept kind.
set -euo pipefail
cd "$(dirname "$0")/.."
PF=${PF:-.venv/bin/patchforge}
for concept in style:stripes object:star color:red identity:kiko; do
  out="patches/${concept/:/-}.fmn.safetensors"
  $PF train --concept "$concept" --out "$out"
  $PF eval "$out" --seeds 8   # 8 seeds x 6 prompts = 48 images per set: one image is ~2 points
done
