#!/usr/bin/env bash
# Rebuild the world-v2 example patches in patches/toy-v2/ and their eval reports, as documented in
# patches/README.md: one default (fmn) patch for a style, an object, a colour, an identity and the
# implicit concept, on the v2 toy model (models/toy-v2). LANES=2 runs two concepts at a time (one torch
# thread each); SEEDS sets eval's image seeds per prompt; OUTDIR where the patches and reports go.
set -euo pipefail
cd "$(dirname "$0")/.."
PF=${PF:-.venv/bin/patchforge}
MODEL=${MODEL:-models/toy-v2/pipeline}
SEEDS=${SEEDS:-4}
LANES=${LANES:-1}
OUTDIR=${OUTDIR:-patches/toy-v2}
mkdir -p "$OUTDIR"
one() {
  local concept=$1 out="$OUTDIR/${1/:/-}.fmn.safetensors"
  OMP_NUM_THREADS=1 $PF train --model "$MODEL" --concept "$concept" --out "$out"
  OMP_NUM_THREADS=1 $PF eval "$out" --model "$MODEL" --seeds "$SEEDS"
}
export -f one; export PF MODEL SEEDS OUTDIR
printf '%s\n' style:stripes object:star color:red identity:kiko implicit:bare |
  xargs -P "$LANES" -I{} bash -c 'one {}'
