#!/bin/bash
# Autotuning against the best fixed configuration `tune` finds (README "Operating a run"):
# six 150×512×512 phantoms at 2.5×0.8×0.8 mm, the paper's 3D patch 112×160×128 (2+2) and
# 2D patch 512×512 (12+12, single-slice bricks). For each: `tune --cores 2`, then `bench
# --autotune --cores 2` started from a bad split (the opposite of the best one), on the
# same shards, with nnU-Net's augmentation.
# Usage: scripts/bench-autotune.sh [WORK_DIR]   (needs a release build: cargo build --release)
set -euo pipefail
B=${CPS3D:-$(pwd)/target/release/cps3d}
W=${1:-runs/bench-autotune}
mkdir -p "$W" && cd "$W"
[ -d data ] || "$B" synth data --labeled 3 --unlabeled 3 --shape 150,512,512 --spacing-xy 0.8,0.8 --spacing-z 2.5,2.5 -j 2 -q
[ -f fp.json ] || "$B" fingerprint data -o fp.json -j 2 -q
[ -f plans.json ] || "$B" plan fp.json -o plans.json --target-spacing 2.5,0.8,0.8 --patch-size 112,160,128 --patch-size-2d 512,512 --max-features-2d 480 -q
[ -d s3d ] || "$B" preprocess data -p plans.json -o s3d -j 2 -q
[ -d s2d_slices ] || "$B" preprocess data -p plans.json -o s2d_slices -c 2d -j 2 -q
for s in s3d s2d_slices; do
  echo "=== tune $s"
  "$B" tune "$s" --cores 2 --batches 20 -q | tail -1
  best=$("$B" tune "$s" --cores 2 --batches 20 --json -q | python3 -c 'import json,sys; r=json.load(sys.stdin)["recommended"]; print(r["loaders"], r["augmenters"])')
  read -r l a <<< "$best"
  # The bad start: the best split turned around (2+1 -> 1+2 and back; 1+1 -> 2+1).
  if [ "$l" -gt "$a" ]; then bl=1; ba=2; elif [ "$a" -gt "$l" ]; then bl=2; ba=1; else bl=2; ba=1; fi
  echo "=== autotune $s from --loaders $bl --augmenters $ba (tune's best: $l + $a)"
  "$B" bench "$s" --autotune --cores 2 --loaders "$bl" --augmenters "$ba" --batches "${BATCHES:-300}" -q 2>&1 | grep -E "autotune|patches/s"
done
